//! The properties the format targets share: what parsing any text must give.

use kiln_proto::client_config::ClientConfig;
use kiln_proto::error::FormatError;
use kiln_proto::manifest::BuildManifest;

/// A manifest parsed from `file` is valid and reads back equal after being written as
/// relbuild.xml; an error names `file`.
pub fn check_manifest(file: &str, parsed: Result<BuildManifest, FormatError>) {
    match parsed {
        Ok(manifest) => {
            manifest.validate().expect("a parsed manifest is valid");
            let written = manifest.to_relbuild_xml();
            let reread =
                BuildManifest::from_relbuild_xml("relbuild.xml", &written).unwrap_or_else(|err| {
                    panic!("written manifest does not reparse: {err}\n{written}")
                });
            assert_eq!(reread, manifest, "written manifest reads back different");
        }
        Err(err) => assert_names_file(file, &err),
    }
}

/// A client config parsed from `file` takes at least one config type; an error names
/// `file`.
pub fn check_client_config(file: &str, parsed: Result<ClientConfig, FormatError>) {
    match parsed {
        Ok(config) => assert!(!config.include.is_empty(), "{config:?}"),
        Err(err) => assert_names_file(file, &err),
    }
}

fn assert_names_file(file: &str, err: &FormatError) {
    let message = err.to_string();
    assert!(message.starts_with(&format!("{file}:")), "{message}");
}
