//! `kiln.toml` as a submitter writes it: any text must give a manifest or an error
//! that names the file, and a manifest must survive being written as XML and reread.

#![no_main]

use kiln_proto::manifest::BuildManifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Files are read as UTF-8 before they are parsed.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    kiln_fuzz::check_manifest("kiln.toml", BuildManifest::from_toml("kiln.toml", text));
});
