//! Compiles the ampy `.proto` files with `protox` (pure Rust, no `protoc`).
//!
//! Outputs in `OUT_DIR`:
//! - `ampy.<domain>.v1.rs`: prost-generated types (one file per package);
//! - `ampy_descriptor_set.bin`: the encoded `FileDescriptorSet` (imports
//!   included, source info stripped) used by the runtime descriptor pool;
//! - `ampy_registry.rs`: a table mapping every message name to its generated
//!   Rust type, used for deterministic re-encoding;
//! - `ampy_docs.rs`: the `.proto` comments of every ampy message and field
//!   (the runtime pool has no source info, so they are kept here).

use std::collections::BTreeSet;
use std::error::Error;
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;

use prost_types::{DescriptorProto, FileDescriptorSet};

/// Every domain package; each lives in `proto/ampy/<domain>/v1/<domain>.proto`.
const DOMAINS: &[&str] = &[
    "common",
    "bars",
    "ticks",
    "fundamentals",
    "news",
    "fx",
    "corporate_actions",
    "universe",
    "signals",
    "orders",
    "fills",
    "positions",
    "metrics",
];

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let proto_root = manifest_dir.join("proto");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", proto_root.display());

    let files: Vec<String> = DOMAINS
        .iter()
        .map(|d| format!("ampy/{d}/v1/{d}.proto"))
        .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", proto_root.join(f).display());
    }

    let mut compiler = protox::Compiler::new([&proto_root])?;
    compiler.include_imports(true);
    compiler.include_source_info(true);
    compiler.open_files(&files)?;
    // With source info, so that .proto comments become rustdoc.
    let fds_with_docs = compiler.file_descriptor_set();
    // Without source info: this is what the runtime pool sees, and what the
    // schema hash consumes, so it must match what protoc would publish.
    compiler.include_source_info(false);
    fs::write(
        out_dir.join("ampy_descriptor_set.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    let items = collect_items(&fds_with_docs);
    fs::write(out_dir.join("ampy_docs.rs"), docs_source(&fds_with_docs))?;

    let mut config = prost_build::Config::new();
    config.btree_map(["."]);
    for item in &items {
        // Paths match by prefix, so a message's attribute would also land on
        // its oneofs: use the message-only / enum-and-oneof-only variants.
        match item.kind {
            Kind::Message => config.message_attribute(&item.proto_path, doc_example(item)),
            Kind::Enum | Kind::Oneof { .. } => {
                config.enum_attribute(&item.proto_path, doc_example(item))
            }
        };
    }
    config.compile_fds(fds_with_docs)?;

    fs::write(out_dir.join("ampy_registry.rs"), registry_source(&items))?;
    Ok(())
}

/// What kind of generated Rust item a proto element becomes.
enum Kind {
    Message,
    Enum,
    /// A oneof inside a message: (message rust name, oneof field name).
    Oneof {
        owner: String,
        field: String,
    },
}

/// A proto element that prost turns into a public Rust item.
struct Item {
    /// `.ampy.bars.v1.Bar` style path understood by `prost_build::Config`.
    proto_path: String,
    /// `ampy.bars.v1.Bar` (messages only; used by the registry).
    full_name: String,
    /// `crate::ampy::bars::v1::Bar` style path of the generated Rust item.
    rust_path: String,
    kind: Kind,
}

fn collect_items(fds: &FileDescriptorSet) -> Vec<Item> {
    let mut items = Vec::new();
    for file in &fds.file {
        let package = file.package();
        if !package.starts_with("ampy.") {
            continue;
        }
        let module = format!("crate::{}", package.replace('.', "::"));
        for message in &file.message_type {
            collect_message(package, &module, message, &mut items);
        }
        for en in &file.enum_type {
            items.push(Item {
                proto_path: format!(".{package}.{}", en.name()),
                full_name: format!("{package}.{}", en.name()),
                rust_path: format!("{module}::{}", en.name()),
                kind: Kind::Enum,
            });
        }
    }
    items
}

fn collect_message(package: &str, module: &str, message: &DescriptorProto, items: &mut Vec<Item>) {
    // The ampy schemas have no nested messages other than map entries, which
    // prost turns into map fields rather than types.
    let name = message.name();
    let full_name = format!("{package}.{name}");
    let rust_path = format!("{module}::{name}");
    for oneof in &message.oneof_decl {
        items.push(Item {
            proto_path: format!(".{full_name}.{}", oneof.name()),
            full_name: format!("{full_name}.{}", oneof.name()),
            rust_path: format!("{module}::{}::{}", snake(name), camel(oneof.name())),
            kind: Kind::Oneof {
                owner: rust_path.clone(),
                field: oneof.name().to_owned(),
            },
        });
    }
    items.push(Item {
        proto_path: format!(".{full_name}"),
        full_name,
        rust_path,
        kind: Kind::Message,
    });
}

/// `CorporateAction` -> `corporate_action`.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `kind` -> `Kind`, `some_name` -> `SomeName`.
fn camel(name: &str) -> String {
    name.split('_')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// A `#[doc = ...]` attribute holding a compiling usage example.
fn doc_example(item: &Item) -> String {
    let path = item.rust_path.replacen("crate::", "ampybus_proto::", 1);
    let body = match &item.kind {
        Kind::Message => format!(
            "use prost::Message;\n\
             let msg = {path}::default();\n\
             let bytes = msg.encode_to_vec();\n\
             assert_eq!({path}::decode(bytes.as_slice()).unwrap(), msg);\n\
             assert!(ampybus_proto::is_known(\"{}\"));",
            item.full_name
        ),
        Kind::Enum => format!(
            "let name = {path}::default().as_str_name();\n\
             assert!(name.ends_with(\"_UNSPECIFIED\"));\n\
             assert_eq!({path}::from_str_name(name), Some({path}::default()));"
        ),
        Kind::Oneof { owner, field } => {
            let owner = owner.replacen("crate::", "ampybus_proto::", 1);
            format!(
                "let msg = {owner}::default();\n\
                 let chosen: Option<&{path}> = msg.{field}.as_ref();\n\
                 assert!(chosen.is_none());"
            )
        }
    };
    let text = format!("\n# Example\n\n```\n{body}\n```");
    format!("#[doc = {text:?}]")
}

/// Source of a `(message full name, field name or "", comment)` table: the leading (else
/// trailing) comment of every top-level ampy message and of its fields.
fn docs_source(fds: &FileDescriptorSet) -> String {
    let mut src = String::from(
        "// @generated by build.rs: (message, field or \"\", .proto comment).\n\
         pub(crate) const DOCS: &[(&str, &str, &str)] = &[\n",
    );
    for file in &fds.file {
        let package = file.package();
        if !package.starts_with("ampy.") {
            continue;
        }
        let Some(info) = &file.source_code_info else {
            continue;
        };
        for loc in &info.location {
            // [4, m] is message m of the file; [4, m, 2, f] its field f.
            let (m, field) = match loc.path.as_slice() {
                [4, m] => (*m, None),
                [4, m, 2, f] => (*m, Some(*f)),
                _ => continue,
            };
            let Some(message) = usize::try_from(m)
                .ok()
                .and_then(|m| file.message_type.get(m))
            else {
                continue;
            };
            let field = match field {
                None => String::new(),
                Some(f) => match usize::try_from(f).ok().and_then(|f| message.field.get(f)) {
                    Some(f) => f.name().to_owned(),
                    None => continue,
                },
            };
            let raw = match (&loc.leading_comments, &loc.trailing_comments) {
                (Some(c), _) if !c.trim().is_empty() => c,
                (_, Some(c)) if !c.trim().is_empty() => c,
                _ => continue,
            };
            let text = raw
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
                .to_owned();
            writeln!(
                src,
                "    ({:?}, {field:?}, {text:?}),",
                format!("{package}.{}", message.name())
            )
            .expect("writing to a String cannot fail");
        }
    }
    src.push_str("];\n");
    src
}

/// Source of a `(full name, re-encode fn)` table for every message type.
fn registry_source(items: &[Item]) -> String {
    let mut names = BTreeSet::new();
    let mut src = String::from(
        "// @generated by build.rs: message full name -> generated Rust type.\n\
         pub(crate) const GENERATED: &[(&str, Recode)] = &[\n",
    );
    for item in items {
        if matches!(item.kind, Kind::Message) && names.insert(item.full_name.clone()) {
            writeln!(
                src,
                "    ({:?}, recode::<{}>),",
                item.full_name, item.rust_path
            )
            .expect("writing to a String cannot fail");
        }
    }
    src.push_str("];\n");
    src
}
