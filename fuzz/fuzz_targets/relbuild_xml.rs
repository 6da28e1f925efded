//! `relbuild.xml` as a submitter writes it: any text must give a manifest or an error
//! that names the file, and a manifest must survive being written back and reread.

#![no_main]

use kiln_proto::manifest::BuildManifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Submissions are read as UTF-8 before they are parsed.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match BuildManifest::from_relbuild_xml("relbuild.xml", text) {
        Ok(manifest) => {
            manifest.validate().expect("a parsed manifest is valid");
            let written = manifest.to_relbuild_xml();
            let reread =
                BuildManifest::from_relbuild_xml("relbuild.xml", &written).unwrap_or_else(|err| {
                    panic!("written manifest does not reparse: {err}\n{written}")
                });
            assert_eq!(reread, manifest, "written manifest reads back different");
        }
        Err(err) => {
            let message = err.to_string();
            assert!(message.starts_with("relbuild.xml:"), "{message}");
        }
    }
});
