//! Client configuration: the seed's `buildclient.xml` and the same content as TOML.
//!
//! [`ClientConfig`] names the client, the config types it takes, how long it waits in
//! a long poll, and the servers it serves ([`ServerEntry`], the seed's REDIRECTs).
//! [`ClientConfig::parse`] reads either form with the same strictness and error
//! positions as the build manifest ([`crate::manifest`]).
//!
//! A REDIRECT's CONFIGLOC is kept as written: the seed's example names a Windows share
//! (`\\ntre101\bvt$`), which the client itself refuses with a clear message when it
//! tries to use it, since kiln talks to servers over HTTP.

use roxmltree::{Document, Node};
use serde::{Deserialize, Serialize};
use toml::{Spanned, Value};

use crate::error::{FormatError, IntegerSpec, TomlReader};
use crate::manifest::{check_config_type, check_name, check_plain_text};
use crate::status_xml::{looks_like_xml, strip_bom, XmlReader};

/// A client's configuration: the seed's BUILDCLIENT element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    /// The BUILDCLIENT's ID attribute: the client id the servers see.
    pub id: String,
    /// WAITTIME in seconds: how long one long poll waits for a job.
    pub wait_secs: u64,
    /// CONFIGINCLUDE: the config types this client takes; `*` takes any.
    pub include: Vec<String>,
    /// REDIRECTS: the servers this client serves.
    pub servers: Vec<ServerEntry>,
    /// Masters to learn more servers from (TOML `[[master]]`; the XML has no such
    /// element). `password` is the client credential, used with the servers too.
    #[serde(default)]
    pub masters: Vec<ServerEntry>,
    /// How many jobs the client runs at once (TOML `slots`; the XML has no such element).
    pub slots: Option<u32>,
    /// The client's work directory (TOML `work`; the XML has no such element).
    pub work_dir: Option<String>,
    /// A PEM file of CA certificates to trust for https:// servers and masters, as
    /// written (TOML `ca_file`; the XML has no such element).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// The job cache directory, `KILN_CACHE` to the jobs (TOML `cache`; the XML has no
    /// such element). None: `cache` in the work directory.
    #[serde(default)]
    pub cache_dir: Option<String>,
    /// The most bytes the job cache keeps between jobs (TOML `cache_max_bytes`; the XML
    /// has no such element). None: the client's default.
    #[serde(default)]
    pub cache_max_bytes: Option<u64>,
}

/// One server a client serves: the seed's REDIRECT element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// CONFIGLOC: the server's URL.
    pub url: String,
    /// USERNAME: kept for the seed's format; the client id is the identity.
    pub username: Option<String>,
    /// PASSWORD: the client credential for this server.
    pub password: Option<String>,
}

/// WAITTIME when the file gives none, in seconds (the seed's example value).
pub const DEFAULT_WAIT_SECS: u64 = 60;

/// The elements the seed's BUILDCLIENT may hold, with kiln's SLOTS and WORK.
const BUILDCLIENT_CHILDREN: &[&str] = &["WAITTIME", "CONFIGINCLUDE", "REDIRECTS", "SLOTS", "WORK"];

/// The elements the seed's REDIRECT may hold.
const REDIRECT_CHILDREN: &[&str] = &["USERNAME", "PASSWORD", "CONFIGLOC"];

const WAIT_SPEC: IntegerSpec = IntegerSpec {
    expected: "an integer number of seconds",
    min: 1,
    max: 24 * 60 * 60,
};

const CACHE_MAX_BYTES_SPEC: IntegerSpec = IntegerSpec {
    expected: "an integer number of bytes",
    min: 0,
    max: i64::MAX as i128,
};

const SLOTS_SPEC: IntegerSpec = IntegerSpec {
    expected: "an integer number of slots",
    min: 1,
    max: 1024,
};

impl ClientConfig {
    /// Parses the seed's `buildclient.xml`: a BUILDCLIENT element (ID attribute) with
    /// WAITTIME, one or more CONFIGINCLUDE, REDIRECTS of REDIRECTs (USERNAME, PASSWORD,
    /// CONFIGLOC), and kiln's optional SLOTS and WORK.
    ///
    /// A CONFIGINCLUDE may list several config types separated by commas, semicolons or
    /// whitespace. WAITTIME defaults to [`DEFAULT_WAIT_SECS`]. `file` is the name errors
    /// carry.
    pub fn from_buildclient_xml(file: &str, text: &str) -> Result<Self, FormatError> {
        let text = strip_bom(text);
        let doc = Document::parse(text).map_err(|err| FormatError::from_xml(file, text, &err))?;
        let xml = XmlReader::new(file, &doc);
        let client = xml.root("BUILDCLIENT", &["ID"])?;
        let Some(id) = client.attribute("ID") else {
            return Err(xml.error_at(
                client,
                "missing the ID attribute of <BUILDCLIENT>; expected a client id",
            ));
        };
        let id = id.trim().to_owned();
        check_name(&id, "a client id", "the ID of <BUILDCLIENT>")
            .map_err(|m| xml.error_at(client, m))?;

        let mut wait_node = None;
        let mut redirects_node = None;
        let mut slots_node = None;
        let mut work_node = None;
        let mut include_nodes = Vec::new();
        for child in xml.child_elements(client, BUILDCLIENT_CHILDREN)? {
            xml.check_attributes(child, &[])?;
            match child.tag_name().name() {
                "WAITTIME" => xml.set_once(&mut wait_node, child)?,
                "REDIRECTS" => xml.set_once(&mut redirects_node, child)?,
                "SLOTS" => xml.set_once(&mut slots_node, child)?,
                "WORK" => xml.set_once(&mut work_node, child)?,
                _ => include_nodes.push(child),
            }
        }

        let wait_secs = xml
            .optional_integer(wait_node, &WAIT_SPEC)?
            .unwrap_or(DEFAULT_WAIT_SECS);
        let mut include = Vec::new();
        for node in &include_nodes {
            let listed = xml.text(*node)?;
            for config_type in listed
                .split(is_include_separator)
                .filter(|part| !part.is_empty())
            {
                check_config_type(config_type, true, "<CONFIGINCLUDE>")
                    .map_err(|m| xml.error_at(*node, m))?;
                push_unique(&mut include, config_type);
            }
        }
        if include.is_empty() {
            return Err(match include_nodes.first() {
                Some(node) => xml.error_at(
                    *node,
                    "expected at least one config type in <CONFIGINCLUDE> (e.g. PRO, or * for \
                     any), found none",
                ),
                None => xml.error_at(
                    client,
                    "missing <CONFIGINCLUDE> in <BUILDCLIENT>; expected the config types this \
                     client takes (e.g. PRO, or * for any)",
                ),
            });
        }
        let servers = match redirects_node {
            Some(redirects) => {
                let mut servers = Vec::new();
                for redirect in xml.child_elements(redirects, &["REDIRECT"])? {
                    servers.push(server_from_xml(&xml, redirect)?);
                }
                servers
            }
            None => Vec::new(),
        };
        let slots = xml.optional_integer(slots_node, &SLOTS_SPEC)?;
        let work_dir = xml.optional_text(work_node)?;
        if let (Some(work_dir), Some(node)) = (&work_dir, work_node) {
            check_plain_text(work_dir, "<WORK>").map_err(|m| xml.error_at(node, m))?;
        }

        Ok(ClientConfig {
            id,
            wait_secs,
            include,
            servers,
            masters: Vec::new(),
            slots,
            work_dir,
            ca_file: None,
            cache_dir: None,
            cache_max_bytes: None,
        })
    }

    /// Parses the client's TOML form: `id`, `wait` (seconds), `include = [..]`, `slots`,
    /// `work`, `ca_file`, one `[[server]]` table (`url`, `username`, `password`) per server and one
    /// `[[master]]` table (same keys) per master to learn servers from.
    ///
    /// Unknown keys are refused. `wait` defaults to [`DEFAULT_WAIT_SECS`]. `file` is the
    /// name errors carry.
    pub fn from_toml(file: &str, text: &str) -> Result<Self, FormatError> {
        let text = strip_bom(text);
        let reader = TomlReader::new(file, text);
        let raw: RawClientConfig = reader.deserialize()?;

        let id = reader.string_or_integer(&raw.id, "id", "a client id")?;
        check_name(&id, "a client id", "`id`").map_err(|m| reader.error_at(raw.id.span(), m))?;
        let wait_secs = reader
            .optional_integer(raw.wait.as_ref(), "wait", &WAIT_SPEC)?
            .unwrap_or(DEFAULT_WAIT_SECS);
        let mut include = Vec::new();
        for config_type in raw.include.get_ref() {
            let trimmed = config_type.get_ref().trim();
            check_config_type(trimmed, true, "`include`")
                .map_err(|m| reader.error_at(config_type.span(), m))?;
            push_unique(&mut include, trimmed);
        }
        if include.is_empty() {
            return Err(reader.error_at(
                raw.include.span(),
                "expected at least one config type in `include` (e.g. \"PRO\", or \"*\" for \
                 any), found an empty array",
            ));
        }
        let slots = reader.optional_integer(raw.slots.as_ref(), "slots", &SLOTS_SPEC)?;
        let work_dir = match &raw.work {
            Some(work) => {
                let trimmed = work.get_ref().trim();
                check_plain_text(trimmed, "`work`").map_err(|m| reader.error_at(work.span(), m))?;
                (!trimmed.is_empty()).then(|| trimmed.to_owned())
            }
            None => None,
        };
        let ca_file = match &raw.ca_file {
            Some(ca_file) => {
                let trimmed = ca_file.get_ref().trim();
                check_plain_text(trimmed, "`ca_file`")
                    .map_err(|m| reader.error_at(ca_file.span(), m))?;
                (!trimmed.is_empty()).then(|| trimmed.to_owned())
            }
            None => None,
        };
        let cache_dir = match &raw.cache {
            Some(cache) => {
                let trimmed = cache.get_ref().trim();
                check_plain_text(trimmed, "`cache`")
                    .map_err(|m| reader.error_at(cache.span(), m))?;
                (!trimmed.is_empty()).then(|| trimmed.to_owned())
            }
            None => None,
        };
        let cache_max_bytes = reader.optional_integer(
            raw.cache_max_bytes.as_ref(),
            "cache_max_bytes",
            &CACHE_MAX_BYTES_SPEC,
        )?;
        let servers = server_tables(&reader, &raw.server, "server")?;
        let masters = server_tables(&reader, &raw.master, "master")?;

        Ok(ClientConfig {
            id,
            wait_secs,
            include,
            servers,
            masters,
            slots,
            work_dir,
            ca_file,
            cache_dir,
            cache_max_bytes,
        })
    }

    /// Parses a client config in either format: by the extension of `file` (`.xml` or
    /// `.toml`), else XML when the text starts with `<` (after a byte order mark and
    /// whitespace), else TOML.
    pub fn parse(file: &str, text: &str) -> Result<Self, FormatError> {
        if looks_like_xml(file, text) {
            ClientConfig::from_buildclient_xml(file, text)
        } else {
            ClientConfig::from_toml(file, text)
        }
    }
}

/// Reads `[[server]]` or `[[master]]` tables (`what` names them in errors).
fn server_tables(
    reader: &TomlReader<'_>,
    tables: &[Spanned<RawServer>],
    what: &str,
) -> Result<Vec<ServerEntry>, FormatError> {
    let mut entries = Vec::new();
    for table in tables {
        let table = table.get_ref();
        let url = table.url.get_ref().trim();
        if url.is_empty() {
            return Err(reader.error_at(
                table.url.span(),
                format!("expected a {what} url in `url`, found an empty string"),
            ));
        }
        entries.push(ServerEntry {
            url: url.to_owned(),
            username: non_empty(table.username.as_deref()),
            password: non_empty(table.password.as_deref()),
        });
    }
    Ok(entries)
}

/// Reads one REDIRECT element.
fn server_from_xml(xml: &XmlReader, redirect: Node) -> Result<ServerEntry, FormatError> {
    xml.check_attributes(redirect, &[])?;
    let mut username_node = None;
    let mut password_node = None;
    let mut location_node = None;
    for child in xml.child_elements(redirect, REDIRECT_CHILDREN)? {
        xml.check_attributes(child, &[])?;
        match child.tag_name().name() {
            "USERNAME" => xml.set_once(&mut username_node, child)?,
            "PASSWORD" => xml.set_once(&mut password_node, child)?,
            _ => xml.set_once(&mut location_node, child)?,
        }
    }
    let (url, _) = xml.required_text(
        redirect,
        location_node,
        "CONFIGLOC",
        "the server's location",
    )?;
    Ok(ServerEntry {
        url,
        username: xml.optional_text(username_node)?,
        password: xml.optional_text(password_node)?,
    })
}

/// Whether `ch` separates config types in a CONFIGINCLUDE.
fn is_include_separator(ch: char) -> bool {
    ch == ',' || ch == ';' || ch.is_whitespace()
}

/// Appends `config_type` unless it is already listed.
fn push_unique(include: &mut Vec<String>, config_type: &str) {
    if !include.iter().any(|listed| listed == config_type) {
        include.push(config_type.to_owned());
    }
}

/// `text` trimmed, or `None` when absent or that leaves nothing.
fn non_empty(text: Option<&str>) -> Option<String> {
    let text = text?.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// The client's TOML form as written: every key, with its place in the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientConfig {
    id: Spanned<Value>,
    wait: Option<Spanned<Value>>,
    include: Spanned<Vec<Spanned<String>>>,
    slots: Option<Spanned<Value>>,
    work: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    cache: Option<Spanned<String>>,
    cache_max_bytes: Option<Spanned<Value>>,
    #[serde(default)]
    server: Vec<Spanned<RawServer>>,
    #[serde(default)]
    master: Vec<Spanned<RawServer>>,
}

/// One `[[server]]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    url: Spanned<String>,
    username: Option<String>,
    password: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's populated `buildclient.xml` example, paragraph [0065], verbatim.
    const SEED_BUILDCLIENT: &str = r#"<BUILDCLIENT ID="RACK05_MACHINE10">
  <WAITTIME>60</WAITTIME>
  <CONFIGINCLUDE>PRO</CONFIGINCLUDE>
  <REDIRECTS>
    <REDIRECT>
      <USERNAME>redmond\bvt</USERNAME>
      <PASSWORD>bvtpassword</PASSWORD>
      <CONFIGLOC>\\ntre101\bvt$</CONFIGLOC>
    </REDIRECT>
  </REDIRECTS>
</BUILDCLIENT>
"#;

    /// The seed's empty `buildclient.xml` schema, paragraph [0064], verbatim (the seed
    /// prints it in two pieces; here they are joined).
    const SEED_BUILDCLIENT_SCHEMA: &str = r#"<BUILDCLIENT ID="">
  <WAITTIME></WAITTIME>
  <CONFIGINCLUDE></CONFIGINCLUDE>
  <REDIRECTS>
<REDIRECT>
  <USERNAME></USERNAME>
  <PASSWORD></PASSWORD>
  <CONFIGLOC></CONFIGLOC>
</REDIRECT>
</REDIRECTS>
</BUILDCLIENT>
"#;

    /// The seed's example as TOML.
    const SEED_CLIENT_TOML: &str = r#"id = "RACK05_MACHINE10"
wait = 60
include = ["PRO"]

[[server]]
username = 'redmond\bvt'
password = "bvtpassword"
url = '\\ntre101\bvt$'
"#;

    fn seed_config() -> ClientConfig {
        ClientConfig {
            id: "RACK05_MACHINE10".to_owned(),
            wait_secs: 60,
            include: vec!["PRO".to_owned()],
            servers: vec![ServerEntry {
                url: r"\\ntre101\bvt$".to_owned(),
                username: Some(r"redmond\bvt".to_owned()),
                password: Some("bvtpassword".to_owned()),
            }],
            masters: Vec::new(),
            slots: None,
            work_dir: None,
            ca_file: None,
            cache_dir: None,
            cache_max_bytes: None,
        }
    }

    fn seed_with(from: &str, to: &str) -> String {
        assert!(
            SEED_BUILDCLIENT.contains(from),
            "{from:?} is not in the seed"
        );
        SEED_BUILDCLIENT.replacen(from, to, 1)
    }

    fn xml_error(text: &str) -> String {
        ClientConfig::from_buildclient_xml("buildclient.xml", text)
            .unwrap_err()
            .to_string()
    }

    fn toml_error(text: &str) -> String {
        ClientConfig::from_toml("client.toml", text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn seed_example_parses_as_written() {
        assert_eq!(
            ClientConfig::from_buildclient_xml("buildclient.xml", SEED_BUILDCLIENT),
            Ok(seed_config())
        );
    }

    #[test]
    fn seed_example_parses_with_declaration() {
        let text = format!("<?xml version=\"1.0\"?>\n{SEED_BUILDCLIENT}");
        assert_eq!(
            ClientConfig::from_buildclient_xml("buildclient.xml", &text),
            Ok(seed_config())
        );
    }

    #[test]
    fn seed_schema_template_is_refused_at_its_empty_id() {
        assert_eq!(
            xml_error(SEED_BUILDCLIENT_SCHEMA),
            "buildclient.xml:1:1: expected a client id (1 to 128 letters, digits, '.', '_' or \
             '-', starting with a letter or digit) in the ID of <BUILDCLIENT>, found \"\""
        );
    }

    #[test]
    fn toml_equals_the_seed_example() {
        assert_eq!(
            ClientConfig::from_toml("client.toml", SEED_CLIENT_TOML),
            Ok(seed_config())
        );
    }

    #[test]
    fn several_config_types_and_extensions() {
        let text = seed_with(
            "  <CONFIGINCLUDE>PRO</CONFIGINCLUDE>\n",
            "  <CONFIGINCLUDE>PRO, HOME;SRV\n  PRO</CONFIGINCLUDE>\n  \
             <CONFIGINCLUDE>*</CONFIGINCLUDE>\n  <CONFIGINCLUDE/>\n  <SLOTS>4</SLOTS>\n  \
             <WORK> /var/lib/kiln </WORK>\n",
        )
        .replace("<WAITTIME>60</WAITTIME>", "<WAITTIME>25</WAITTIME>");
        let mut expected = seed_config();
        expected.wait_secs = 25;
        expected.include = ["PRO", "HOME", "SRV", "*"].map(str::to_owned).to_vec();
        expected.slots = Some(4);
        expected.work_dir = Some("/var/lib/kiln".to_owned());
        assert_eq!(
            ClientConfig::from_buildclient_xml("buildclient.xml", &text),
            Ok(expected)
        );
    }

    #[test]
    fn wait_time_defaults_to_60() {
        let text = seed_with("  <WAITTIME>60</WAITTIME>\n", "");
        assert_eq!(
            ClientConfig::from_buildclient_xml("buildclient.xml", &text),
            Ok(seed_config())
        );
        let text = seed_with("<WAITTIME>60</WAITTIME>", "<WAITTIME></WAITTIME>");
        assert_eq!(
            ClientConfig::from_buildclient_xml("buildclient.xml", &text),
            Ok(seed_config())
        );
    }

    #[test]
    fn no_redirects_means_no_servers() {
        let start = SEED_BUILDCLIENT.find("  <REDIRECTS>").unwrap_or_default();
        let end = SEED_BUILDCLIENT.find("</BUILDCLIENT>").unwrap_or_default();
        let text = format!("{}{}", &SEED_BUILDCLIENT[..start], &SEED_BUILDCLIENT[end..]);
        let mut expected = seed_config();
        expected.servers.clear();
        assert_eq!(
            ClientConfig::from_buildclient_xml("buildclient.xml", &text),
            Ok(expected)
        );
    }

    #[test]
    fn empty_username_and_password_are_none() {
        let text = seed_with(r"redmond\bvt", "").replace("bvtpassword", "  ");
        let mut expected = seed_config();
        expected.servers[0].username = None;
        expected.servers[0].password = None;
        assert_eq!(
            ClientConfig::from_buildclient_xml("buildclient.xml", &text),
            Ok(expected)
        );
    }

    #[test]
    fn missing_required_parts() {
        assert_eq!(
            xml_error(&seed_with(" ID=\"RACK05_MACHINE10\"", "")),
            "buildclient.xml:1:1: missing the ID attribute of <BUILDCLIENT>; expected a client id"
        );
        assert_eq!(
            xml_error(&seed_with("  <CONFIGINCLUDE>PRO</CONFIGINCLUDE>\n", "")),
            "buildclient.xml:1:1: missing <CONFIGINCLUDE> in <BUILDCLIENT>; expected the config \
             types this client takes (e.g. PRO, or * for any)"
        );
        assert_eq!(
            xml_error(&seed_with(">PRO<", "> , ; <")),
            "buildclient.xml:3:3: expected at least one config type in <CONFIGINCLUDE> (e.g. \
             PRO, or * for any), found none"
        );
        assert_eq!(
            xml_error(&seed_with("      <CONFIGLOC>\\\\ntre101\\bvt$</CONFIGLOC>\n", "")),
            "buildclient.xml:5:5: missing <CONFIGLOC> in <REDIRECT>; expected the server's location"
        );
        assert_eq!(
            xml_error(&seed_with("\\\\ntre101\\bvt$", "")),
            "buildclient.xml:8:7: expected the server's location in <CONFIGLOC>, found an empty \
             element"
        );
    }

    #[test]
    fn wrong_numbers() {
        assert_eq!(
            xml_error(&seed_with(">60<", ">1m<")),
            "buildclient.xml:2:3: expected an integer number of seconds in <WAITTIME>, found \"1m\""
        );
        assert_eq!(
            xml_error(&seed_with(">60<", ">0<")),
            "buildclient.xml:2:3: expected an integer number of seconds from 1 to 86400 in \
             <WAITTIME>, found \"0\""
        );
        assert_eq!(
            xml_error(&seed_with(
                "  <REDIRECTS>",
                "  <SLOTS>0</SLOTS>\n  <REDIRECTS>"
            )),
            "buildclient.xml:4:3: expected an integer number of slots from 1 to 1024 in \
             <SLOTS>, found \"0\""
        );
    }

    #[test]
    fn bad_config_types_are_refused() {
        assert_eq!(
            xml_error(&seed_with(">PRO<", ">PRO/x<")),
            "buildclient.xml:3:3: expected a config type (no whitespace, '/', '\\', ',' or ';') \
             in <CONFIGINCLUDE>, found \"PRO/x\" (it contains '/')"
        );
    }

    #[test]
    fn unknown_elements_are_named() {
        assert_eq!(
            xml_error(&seed_with("<WAITTIME>60</WAITTIME>", "<WAIT>60</WAIT>")),
            "buildclient.xml:2:3: unknown element <WAIT> in <BUILDCLIENT>; expected one of \
             <WAITTIME>, <CONFIGINCLUDE>, <REDIRECTS>, <SLOTS>, <WORK>"
        );
        assert_eq!(
            xml_error(&seed_with("<PASSWORD>", "<PASWORD>").replace("</PASSWORD>", "</PASWORD>")),
            "buildclient.xml:7:7: unknown element <PASWORD> in <REDIRECT>; expected one of \
             <USERNAME>, <PASSWORD>, <CONFIGLOC>"
        );
        assert_eq!(
            xml_error(&seed_with("<REDIRECT>", "<SERVER>").replace("</REDIRECT>", "</SERVER>")),
            "buildclient.xml:5:5: unknown element <SERVER> in <REDIRECTS>; expected one of \
             <REDIRECT>"
        );
    }

    #[test]
    fn duplicates_and_malformed_xml() {
        assert_eq!(
            xml_error(&seed_with(
                "<WAITTIME>60</WAITTIME>",
                "<WAITTIME>60</WAITTIME><WAITTIME>5</WAITTIME>"
            )),
            "buildclient.xml:2:26: duplicate <WAITTIME> in <BUILDCLIENT>; the first one is at \
             line 2, column 3"
        );
        assert_eq!(
            xml_error(&seed_with("</REDIRECTS>", "</REDIRECT>")),
            "buildclient.xml:10:3: malformed xml: expected 'REDIRECTS' tag, not 'REDIRECT'"
        );
        assert_eq!(
            xml_error(&seed_with("ID=\"RACK05_MACHINE10\"", "ID=RACK05")),
            "buildclient.xml:1:17: malformed xml: expected a quote not 'R'"
        );
    }

    #[test]
    fn wrong_root_and_unsafe_id() {
        assert_eq!(
            xml_error("<SERVER/>"),
            "buildclient.xml:1:1: expected the root element <BUILDCLIENT>, found <SERVER>"
        );
        assert_eq!(
            xml_error(&seed_with("RACK05_MACHINE10", "../rack")),
            "buildclient.xml:1:1: expected a client id (1 to 128 letters, digits, '.', '_' or \
             '-', starting with a letter or digit) in the ID of <BUILDCLIENT>, found \"../rack\""
        );
    }

    #[test]
    fn toml_with_everything() {
        let text = r#"
id = 17
wait = 5
include = ["PRO", " HOME ", "PRO", "*"]
slots = 2
work = "/srv/kiln"
ca_file = " ca.pem "
cache = "/srv/kiln-cache"
cache_max_bytes = 4294967296

[[server]]
url = "http://a.example:8080"

[[server]]
url = "https://b.example"
username = ""
password = "secret"

[[master]]
url = "http://master1.example:7070"
password = "fleet-secret"

[[master]]
url = "http://master2.example:7070"
"#;
        let expected = ClientConfig {
            id: "17".to_owned(),
            wait_secs: 5,
            include: ["PRO", "HOME", "*"].map(str::to_owned).to_vec(),
            servers: vec![
                ServerEntry {
                    url: "http://a.example:8080".to_owned(),
                    username: None,
                    password: None,
                },
                ServerEntry {
                    url: "https://b.example".to_owned(),
                    username: None,
                    password: Some("secret".to_owned()),
                },
            ],
            masters: vec![
                ServerEntry {
                    url: "http://master1.example:7070".to_owned(),
                    username: None,
                    password: Some("fleet-secret".to_owned()),
                },
                ServerEntry {
                    url: "http://master2.example:7070".to_owned(),
                    username: None,
                    password: None,
                },
            ],
            slots: Some(2),
            work_dir: Some("/srv/kiln".to_owned()),
            ca_file: Some("ca.pem".to_owned()),
            cache_dir: Some("/srv/kiln-cache".to_owned()),
            cache_max_bytes: Some(4294967296),
        };
        assert_eq!(ClientConfig::from_toml("client.toml", text), Ok(expected));
    }

    #[test]
    fn toml_defaults_and_errors() {
        let config = ClientConfig::from_toml("client.toml", "id = \"c1\"\ninclude = [\"*\"]\n");
        assert_eq!(
            config,
            Ok(ClientConfig {
                id: "c1".to_owned(),
                wait_secs: 60,
                include: vec!["*".to_owned()],
                servers: Vec::new(),
                masters: Vec::new(),
                slots: None,
                work_dir: None,
                ca_file: None,
                cache_dir: None,
                cache_max_bytes: None,
            })
        );
        assert_eq!(
            toml_error("id = \"c1\"\ninclude = []\n"),
            "client.toml:2:11: expected at least one config type in `include` (e.g. \"PRO\", or \
             \"*\" for any), found an empty array"
        );
        assert_eq!(
            toml_error("id = \"c1\"\n"),
            "client.toml:1:1: invalid toml: missing field `include`"
        );
        assert_eq!(
            toml_error("id = \"c1\"\ninclude = [\"*\"]\nwiat = 5\n"),
            "client.toml:3:1: invalid toml: unknown field `wiat`, expected one of `id`, `wait`, \
             `include`, `slots`, `work`, `ca_file`, `cache`, `cache_max_bytes`, `server`, \
             `master`"
        );
        assert_eq!(
            toml_error("id = \"c1\"\ninclude = [\"*\"]\nwait = \"60s\"\n"),
            "client.toml:3:8: expected an integer number of seconds in `wait`, found the string \
             \"60s\""
        );
        assert_eq!(
            toml_error("id = \"c1\"\ninclude = [\"PRO X\"]\n"),
            "client.toml:2:12: expected a config type (no whitespace, '/', '\\', ',' or ';') in \
             `include`, found \"PRO X\" (it contains whitespace)"
        );
        assert_eq!(
            toml_error("id = \"c1\"\ninclude = [\"*\"]\n[[server]]\nurl = \" \"\n"),
            "client.toml:4:7: expected a server url in `url`, found an empty string"
        );
        assert_eq!(
            toml_error(
                "id = \"c1\"\ninclude = [\"*\"]\n[[server]]\nurl = \"http://a\"\nuser = \"x\"\n"
            ),
            "client.toml:5:1: invalid toml: unknown field `user`, expected one of `url`, \
             `username`, `password`"
        );
        assert_eq!(
            toml_error("id = \"a b\"\ninclude = [\"*\"]\n"),
            "client.toml:1:6: expected a client id (1 to 128 letters, digits, '.', '_' or '-', \
             starting with a letter or digit) in `id`, found \"a b\""
        );
    }

    #[test]
    fn parse_chooses_the_format() {
        assert_eq!(
            ClientConfig::parse("buildclient.xml", SEED_BUILDCLIENT),
            Ok(seed_config())
        );
        assert_eq!(
            ClientConfig::parse("client.toml", SEED_CLIENT_TOML),
            Ok(seed_config())
        );
        assert_eq!(
            ClientConfig::parse("client.conf", SEED_BUILDCLIENT),
            Ok(seed_config())
        );
        assert_eq!(
            ClientConfig::parse("client.conf", SEED_CLIENT_TOML),
            Ok(seed_config())
        );
    }
}
