//! The generated references: docs/configuration.md from the config
//! structs' doc comments and their defaults in code, and
//! docs/api-reference.md from the comments of the public .proto files (the
//! descriptor set the node serves through reflection). Each test fails
//! when its file drifts from what it generates; `CELL0_BLESS=1` rewrites
//! the file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet, ServiceDescriptorProto, SourceCodeInfo};

/// Compares `generated` with the file `path` (relative to the workspace
/// root), or writes it when blessing.
fn check_generated(path: &str, committed: &str, generated: &str) {
    if std::env::var_os("CELL0_BLESS").is_some() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
        std::fs::write(file, generated).unwrap();
        return;
    }
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "{path} is not what the sources generate (first difference at line {}): regenerate it with \
             CELL0_BLESS=1 cargo nextest run --workspace -E 'binary(reference_docs)'\n  committed: {:?}\n  generated: {:?}",
            line + 1,
            committed.lines().nth(line).unwrap_or(""),
            generated.lines().nth(line).unwrap_or("")
        );
    }
}

/// Collapses doc or comment lines into one paragraph for a table cell.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

// ---------------------------------------------------------------------------
// The configuration reference.

/// The config sources, in the order their structs are looked up.
const CONFIG_SOURCES: [(&str, &str); 3] = [
    ("node/src/config.rs", include_str!("../src/config.rs")),
    ("consensus/src/config.rs", include_str!("../../consensus/src/config.rs")),
    (
        "node/inference/src/config.rs",
        include_str!("../inference/src/config.rs"),
    ),
];

/// One documented field of a config struct.
struct Field {
    name: String,
    ty: String,
    doc: String,
}

/// One config struct: its doc comment and fields, in source order.
struct Struct {
    doc: String,
    fields: Vec<Field>,
}

/// Every `pub struct` with named fields in `source`, by name. Doc comments
/// (`///`) attach to the next struct or field; attributes are skipped.
fn parse_structs(source: &str, into: &mut BTreeMap<String, Struct>) {
    let mut doc = Vec::new();
    let mut current: Option<(String, Struct)> = None;
    for line in source.lines() {
        let t = line.trim();
        if let Some(d) = t.strip_prefix("///") {
            doc.push(d.trim().to_string());
        } else if t.starts_with("#[") {
        } else if let Some(rest) = t.strip_prefix("pub struct ").filter(|r| r.ends_with('{')) {
            let name = rest.trim_end_matches('{').trim().to_string();
            current = Some((
                name,
                Struct {
                    doc: doc.join(" "),
                    fields: Vec::new(),
                },
            ));
            doc.clear();
        } else if line == "}" {
            if let Some((name, s)) = current.take() {
                into.insert(name, s);
            }
            doc.clear();
        } else if let (Some((_, s)), Some(rest)) = (current.as_mut(), t.strip_prefix("pub ")) {
            let (name, ty) = rest.split_once(':').expect("a field `pub name: Type,`");
            s.fields.push(Field {
                name: name.trim().to_string(),
                ty: ty.trim().trim_end_matches(',').to_string(),
                doc: doc.join(" "),
            });
            doc.clear();
        } else {
            doc.clear();
        }
    }
}

/// A default as the config file would spell it.
fn toml_value(value: Option<&toml::Value>) -> String {
    match value {
        None => "unset".to_string(),
        Some(toml::Value::String(s)) => format!("`{s:?}`"),
        Some(v) => format!("`{v}`"),
    }
}

/// Writes the table of struct `name` as section `section` (empty: the top
/// level) and then its struct-typed fields as sections of their own.
fn config_section(
    out: &mut String,
    structs: &BTreeMap<String, Struct>,
    name: &str,
    section: &str,
    doc: &str,
    defaults: &toml::Table,
) {
    let s = &structs[name];
    if section.is_empty() {
        out.push_str("## Top level\n\n");
    } else {
        out.push_str(&format!("## `[{section}]`\n\n{}\n\n", cell(doc)));
    }
    let nested: Vec<&Field> = s.fields.iter().filter(|f| structs.contains_key(&f.ty)).collect();
    out.push_str("| key | type | default | description |\n|---|---|---|---|\n");
    for f in s.fields.iter().filter(|f| !structs.contains_key(&f.ty)) {
        assert!(!f.doc.is_empty(), "{name}.{} has no doc comment", f.name);
        out.push_str(&format!(
            "| `{}` | `{}` | {} | {} |\n",
            f.name,
            f.ty.replace('|', "\\|"),
            toml_value(defaults.get(&f.name)),
            cell(&f.doc)
        ));
    }
    out.push('\n');
    for f in nested {
        let table = match defaults.get(&f.name) {
            Some(toml::Value::Table(t)) => t.clone(),
            _ => toml::Table::new(),
        };
        let path = if section.is_empty() {
            f.name.clone()
        } else {
            format!("{section}.{}", f.name)
        };
        let doc = format!("{} {}", f.doc, structs[&f.ty].doc);
        config_section(out, structs, &f.ty, &path, &doc, &table);
    }
}

fn configuration_reference() -> String {
    let mut structs = BTreeMap::new();
    for (_, source) in CONFIG_SOURCES {
        parse_structs(source, &mut structs);
    }
    let defaults = toml::Table::try_from(cell0::config::NodeConfig::default()).unwrap();
    let sources: Vec<String> = CONFIG_SOURCES.iter().map(|(p, _)| format!("`{p}`")).collect();
    let mut out = format!(
        "# Configuration reference\n\n\
         Generated from the doc comments of the config structs ({}) and their defaults in code; \
         a test (`node/tests/reference_docs.rs`) fails when this file drifts from them. \
         Regenerate it with `CELL0_BLESS=1 cargo nextest run --workspace -E 'binary(reference_docs)'`.\n\n\
         A node reads, lowest precedence first: these defaults, the TOML file of `--config` \
         (env `CELL0_CONFIG`), `CELL0_*` environment variables and flags (`cell0 run --help` \
         names each flag's variable). Unknown keys are refused, and a value out of range stops \
         the node with one line naming the field. `cell0 doctor` takes the same file and flags \
         and checks the machine against them. See [operations.md](operations.md) for a guided \
         setup.\n\n",
        sources.join(", ")
    );
    config_section(&mut out, &structs, "NodeConfig", "", "", &defaults);
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

#[test]
fn the_configuration_reference_matches_the_config_structs() {
    let generated = configuration_reference();
    // Every section of the config file is documented.
    for section in ["raft", "inference", "gossip", "tls", "acl", "audit", "limits"] {
        assert!(generated.contains(&format!("## `[{section}]`")), "{section} missing");
    }
    check_generated(
        "docs/configuration.md",
        include_str!("../../docs/configuration.md"),
        &generated,
    );
}

// ---------------------------------------------------------------------------
// The API reference.

/// Comments by source path (the descriptor's location paths).
struct Comments(BTreeMap<Vec<i32>, String>);

impl Comments {
    fn new(info: Option<&SourceCodeInfo>) -> Self {
        let mut map = BTreeMap::new();
        for loc in info.map(|i| i.location.as_slice()).unwrap_or_default() {
            if let Some(c) = &loc.leading_comments {
                map.insert(loc.path.clone(), c.clone());
            }
        }
        Self(map)
    }

    fn at(&self, path: &[i32]) -> String {
        self.0.get(path).map_or_else(String::new, |c| cell(c))
    }
}

// Field numbers of descriptor.proto, as location paths use them.
const FILE_MESSAGE: i32 = 4;
const FILE_ENUM: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED: i32 = 3;
const MESSAGE_ENUM: i32 = 4;
const SERVICE_METHOD: i32 = 2;
const ENUM_VALUE: i32 = 2;

/// A field's type as the .proto file spells it.
fn field_type(f: &prost_types::FieldDescriptorProto) -> String {
    use prost_types::field_descriptor_proto::{Label, Type};
    let base = match f.r#type() {
        Type::Message | Type::Enum => f.type_name().trim_start_matches(".cell0.v1.").to_string(),
        other => other.as_str_name().trim_start_matches("TYPE_").to_lowercase(),
    };
    if f.label() == Label::Repeated {
        format!("repeated {base}")
    } else {
        base
    }
}

fn api_service(out: &mut String, s: &ServiceDescriptorProto, path: &[i32], comments: &Comments) {
    out.push_str(&format!("### service `{}`\n\n", s.name()));
    let doc = comments.at(path);
    if !doc.is_empty() {
        out.push_str(&format!("{doc}\n\n"));
    }
    out.push_str("| method | request | response | description |\n|---|---|---|---|\n");
    for (i, m) in s.method.iter().enumerate() {
        let stream = |yes: bool| if yes { "stream " } else { "" };
        let mut p = path.to_vec();
        p.extend([SERVICE_METHOD, i as i32]);
        out.push_str(&format!(
            "| `{}` | {}`{}` | {}`{}` | {} |\n",
            m.name(),
            stream(m.client_streaming()),
            m.input_type().trim_start_matches(".cell0.v1."),
            stream(m.server_streaming()),
            m.output_type().trim_start_matches(".cell0.v1."),
            comments.at(&p)
        ));
    }
    out.push('\n');
}

fn api_message(out: &mut String, m: &DescriptorProto, prefix: &str, path: &[i32], comments: &Comments) {
    let name = format!("{prefix}{}", m.name());
    out.push_str(&format!("### message `{name}`\n\n"));
    let doc = comments.at(path);
    if !doc.is_empty() {
        out.push_str(&format!("{doc}\n\n"));
    }
    if m.field.is_empty() {
        out.push_str("No fields.\n\n");
    } else {
        out.push_str("| # | field | type | description |\n|---|---|---|---|\n");
        for (i, f) in m.field.iter().enumerate() {
            let mut p = path.to_vec();
            p.extend([MESSAGE_FIELD, i as i32]);
            out.push_str(&format!(
                "| {} | `{}` | `{}` | {} |\n",
                f.number(),
                f.name(),
                field_type(f),
                comments.at(&p)
            ));
        }
        out.push('\n');
    }
    for (i, e) in m.enum_type.iter().enumerate() {
        let mut p = path.to_vec();
        p.extend([MESSAGE_ENUM, i as i32]);
        api_enum(out, e, &format!("{name}."), &p, comments);
    }
    for (i, n) in m.nested_type.iter().enumerate() {
        // Map entries are spelled as map<K, V> fields; they have no docs.
        if n.options.as_ref().is_some_and(|o| o.map_entry()) {
            continue;
        }
        let mut p = path.to_vec();
        p.extend([MESSAGE_NESTED, i as i32]);
        api_message(out, n, &format!("{name}."), &p, comments);
    }
}

fn api_enum(out: &mut String, e: &EnumDescriptorProto, prefix: &str, path: &[i32], comments: &Comments) {
    out.push_str(&format!("### enum `{prefix}{}`\n\n", e.name()));
    let doc = comments.at(path);
    if !doc.is_empty() {
        out.push_str(&format!("{doc}\n\n"));
    }
    out.push_str("| value | name | description |\n|---|---|---|\n");
    for (i, v) in e.value.iter().enumerate() {
        let mut p = path.to_vec();
        p.extend([ENUM_VALUE, i as i32]);
        out.push_str(&format!("| {} | `{}` | {} |\n", v.number(), v.name(), comments.at(&p)));
    }
    out.push('\n');
}

fn api_reference() -> String {
    let set = FileDescriptorSet::decode(cell0_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut files: Vec<_> = set.file.iter().filter(|f| f.package() == "cell0.v1").collect();
    files.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = String::from(
        "# API reference (`cell0.v1`)\n\n\
         Generated from the comments of the public .proto files under `proto/cell0/v1/` \
         (the descriptor set the node also serves through gRPC reflection); a test \
         (`node/tests/reference_docs.rs`) fails when this file drifts from them. Regenerate it \
         with `CELL0_BLESS=1 cargo nextest run --workspace -E 'binary(reference_docs)'`. \
         [api.md](api.md) explains the API's conventions: errors and their reasons, \
         consistency, limits, metadata.\n\n",
    );
    for f in files {
        let comments = Comments::new(f.source_code_info.as_ref());
        out.push_str(&format!("## `{}`\n\n", f.name()));
        for (i, s) in f.service.iter().enumerate() {
            api_service(&mut out, s, &[FILE_SERVICE, i as i32], &comments);
        }
        for (i, e) in f.enum_type.iter().enumerate() {
            api_enum(&mut out, e, "", &[FILE_ENUM, i as i32], &comments);
        }
        for (i, m) in f.message_type.iter().enumerate() {
            api_message(&mut out, m, "", &[FILE_MESSAGE, i as i32], &comments);
        }
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

#[test]
fn the_api_reference_matches_the_proto_comments() {
    let generated = api_reference();
    for service in ["Kv", "Cluster", "Agents", "Acl", "Inference"] {
        assert!(
            generated.contains(&format!("### service `{service}`")),
            "{service} missing"
        );
    }
    // The comments came through (the descriptor keeps source info).
    assert!(
        generated.contains("This node's view of the cluster."),
        "no comments in the descriptor set"
    );
    check_generated(
        "docs/api-reference.md",
        include_str!("../../docs/api-reference.md"),
        &generated,
    );
}
