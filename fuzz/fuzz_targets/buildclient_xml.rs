//! `buildclient.xml` as an operator writes it: any text must give a client config or
//! an error that names the file.

#![no_main]

use kiln_proto::client_config::ClientConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Files are read as UTF-8 before they are parsed.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    kiln_fuzz::check_client_config(
        "buildclient.xml",
        ClientConfig::from_buildclient_xml("buildclient.xml", text),
    );
});
