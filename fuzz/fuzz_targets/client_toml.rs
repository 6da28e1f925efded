//! The client's TOML config: any text must give a client config or an error that
//! names the file.

#![no_main]

use kiln_proto::client_config::ClientConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ClientConfig::from_toml("client.toml", text) {
        Ok(config) => assert!(!config.include.is_empty(), "{config:?}"),
        Err(err) => {
            let message = err.to_string();
            assert!(message.starts_with("client.toml:"), "{message}");
        }
    }
});
