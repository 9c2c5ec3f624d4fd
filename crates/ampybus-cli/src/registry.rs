//! `ampybus registry …`: check the topic registry (and service manifests), generate broker
//! permissions and the AsyncAPI document. Generators write to stdout (or `--out FILE`).

use crate::error::{CliError, CliResult, EXIT_INVALID, EXIT_OK};
use ampybus::registry::asyncapi::{self, SchemaSource, component_name};
use ampybus::registry::{Manifest, Registry, RegistryError, Severity, acl};
use clap::{Args, Subcommand, ValueEnum};
use prost_reflect::{Kind, MessageDescriptor};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `ampybus registry`.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    #[command(subcommand)]
    pub command: RegistryCommand,
}

/// Output format of `registry asyncapi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// YAML
    Yaml,
    /// JSON
    Json,
}

/// The `registry` subcommands.
#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Check the registry (and manifests): exit 0 with a summary, 1 with one line per problem,
    /// 2 when a file cannot be read or parsed
    #[command(after_help = "\
Examples:
  ampybus registry check --registry registry.example.toml
  ampybus registry check --registry registry.toml --manifests services/

Problems (exit 1), one line each naming the file, line and entry: two owners whose patterns
overlap (any topic both match), a schema unknown to ampybus-proto (ampy.raw.v1.Bytes is always
known), a bad pattern, tier, retention_days or max_rate, an entry claiming the dlq or control
domain, a manifest publishing or consuming outside what the registry gives its service.
Warnings (exit 0): entries of one owner that overlap, entries with different tier or retention
sharing one Redis stream / Kafka topic (ampy.{env}.{domain}.{version}).")]
    Check {
        /// Directory of service manifests (*.toml: `service = \"…\"`, [[publishes]] and
        /// [[consumes]] entries with pattern and schema)
        #[arg(long, value_name = "DIR")]
        manifests: Option<PathBuf>,
    },
    /// nats-server `authorization` block: one user per service
    #[command(after_help = "\
Examples:
  ampybus --registry registry.toml registry nats-config --passwords passwords.toml > auth.conf
  ampybus --registry registry.toml registry nats-config --passwords pw.toml --stream-prefix AMPY --out auth.conf

passwords.toml holds one `service = \"password\"` line per service of the registry. Include the
output in nats-server.conf (`include \"auth.conf\"`). Read permissions are per stream
({prefix}_{ENV}_{DOMAIN}); publish permissions follow the patterns exactly.")]
    NatsConfig {
        /// TOML file of `service = \"password\"`
        #[arg(long, value_name = "FILE")]
        passwords: PathBuf,
        /// Stream prefix of the NATS binding (URL option stream_prefix)
        #[arg(long, value_name = "PREFIX", default_value = "AMPY")]
        stream_prefix: String,
        /// Write to FILE instead of stdout
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Redis ACL file (redis-server --aclfile): one user per service
    #[command(after_help = "\
Examples:
  ampybus --registry registry.toml registry redis-acl --passwords passwords.toml > users.acl
  redis-server --aclfile users.acl

Keys are per stream (ampy.{env}.{domain}.{version}); the default user is turned off.")]
    RedisAcl {
        /// TOML file of `service = \"password\"`
        #[arg(long, value_name = "FILE")]
        passwords: PathBuf,
        /// Key prefix of the Redis binding (URL option key_prefix)
        #[arg(long, value_name = "PREFIX", default_value = "")]
        key_prefix: String,
        /// Write to FILE instead of stdout
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// kafka-acls commands: one principal (User:service) per service
    #[command(after_help = "\
Examples:
  ampybus --registry registry.toml registry kafka-acl --bootstrap-server broker:9092 > acls.sh

Not tested against an ACL-enabled broker; review before applying.")]
    KafkaAcl {
        /// Topic namespace of the Kafka binding (URL option namespace)
        #[arg(long, value_name = "NS", default_value = "")]
        namespace: String,
        /// --bootstrap-server written into the commands
        #[arg(long, value_name = "HOST:PORT", default_value = "localhost:9092")]
        bootstrap_server: String,
        /// Write to FILE instead of stdout
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// AsyncAPI 3.0 document: channels per pattern, owner/consumer operations, message schemas
    #[command(after_help = "\
Examples:
  ampybus --registry registry.toml registry asyncapi > asyncapi.yaml
  ampybus --registry registry.toml registry asyncapi --format json --out asyncapi.json")]
    Asyncapi {
        /// yaml or json
        #[arg(long, value_enum, default_value_t = Format::Yaml)]
        format: Format,
        /// Write to FILE instead of stdout
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

fn no_registry() -> CliError {
    CliError::usage(
        "no registry: give --registry FILE, set $AMPYBUS_REGISTRY, or `registry = \"…\"` in the config file",
    )
}

fn registry_err(e: RegistryError) -> CliError {
    CliError::usage(format!("registry {e}"))
}

/// Loads the registry strictly (for enforcement and the generators).
pub fn load(path: &Path) -> CliResult<Registry> {
    Registry::load(path).map_err(registry_err)
}

fn emit(text: &str, out: Option<&Path>) -> CliResult<()> {
    match out {
        Some(p) => std::fs::write(p, text)
            .map_err(|e| CliError::usage(format!("--out {}: {e}", p.display()))),
        None => {
            use std::io::Write;
            let mut o = std::io::stdout().lock();
            o.write_all(text.as_bytes())
                .and_then(|_| o.flush())
                .map_err(|e| CliError::transport(format!("writing stdout: {e}")))
        }
    }
}

/// A generator that needs the passwords file: loads both, writes what `make` returns to
/// stdout or `out`; a password problem names the passwords file.
fn generate_with_passwords(
    path: &Path,
    passwords: &Path,
    out: Option<&Path>,
    make: impl FnOnce(
        &ampybus::registry::Registry,
        &acl::Passwords,
    ) -> Result<String, ampybus::registry::RegistryError>,
) -> CliResult<u8> {
    let reg = load(path)?;
    let pw = acl::load_passwords(passwords).map_err(registry_err)?;
    let text = make(&reg, &pw)
        .map_err(|e| CliError::usage(format!("--passwords {}: {e}", passwords.display())))?;
    emit(&text, out)?;
    Ok(EXIT_OK)
}

/// Runs `ampybus registry …`.
pub fn run(registry: Option<&Path>, args: RegistryArgs) -> CliResult<u8> {
    let path = registry.ok_or_else(no_registry)?;
    match args.command {
        RegistryCommand::Check { manifests } => check(path, manifests.as_deref()),
        RegistryCommand::NatsConfig {
            passwords,
            stream_prefix,
            out,
        } => generate_with_passwords(path, &passwords, out.as_deref(), |reg, pw| {
            acl::nats_config(reg, pw, &stream_prefix)
        }),
        RegistryCommand::RedisAcl {
            passwords,
            key_prefix,
            out,
        } => generate_with_passwords(path, &passwords, out.as_deref(), |reg, pw| {
            acl::redis_acl(reg, pw, &key_prefix)
        }),
        RegistryCommand::KafkaAcl {
            namespace,
            bootstrap_server,
            out,
        } => {
            let reg = load(path)?;
            emit(
                &acl::kafka_acl(&reg, &namespace, &bootstrap_server),
                out.as_deref(),
            )?;
            Ok(EXIT_OK)
        }
        RegistryCommand::Asyncapi { format, out } => {
            let reg = load(path)?;
            let doc = asyncapi::document(&reg, &ProtoSchemas);
            let text = match format {
                Format::Json => format!(
                    "{}\n",
                    serde_json::to_string_pretty(&doc).unwrap_or_default()
                ),
                Format::Yaml => asyncapi::to_yaml(&doc),
            };
            emit(&text, out.as_deref())?;
            Ok(EXIT_OK)
        }
    }
}

/// `registry check`: problems and warnings on stdout, one line each, then the summary.
fn check(path: &Path, manifests: Option<&Path>) -> CliResult<u8> {
    let reg = Registry::load_unchecked(path).map_err(registry_err)?;
    let mut found = reg.check(&ampybus_proto::is_known);
    let mut manifest_count = 0;
    if let Some(dir) = manifests {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| CliError::usage(format!("--manifests {}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for f in files {
            let m = Manifest::load(&f).map_err(|e| CliError::usage(format!("manifest {e}")))?;
            found.extend(reg.check_manifest(&m));
            manifest_count += 1;
        }
    }
    let errors = found
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = found.len() - errors;
    let mut text = String::new();
    for f in &found {
        text.push_str(&f.to_string());
        text.push('\n');
    }
    let summary = format!(
        "{}: {} entries, {} services, {manifest_count} manifest(s), {errors} problem(s), {warnings} warning(s)",
        path.display(),
        reg.entries().len(),
        reg.services().len(),
    );
    text.push_str(&if errors == 0 {
        format!("OK {summary}\n")
    } else {
        format!("FAIL {summary}\n")
    });
    emit(&text, None)?;
    Ok(if errors == 0 { EXIT_OK } else { EXIT_INVALID })
}

/// Payload schemas for the AsyncAPI document from the `ampybus-proto` descriptors.
struct ProtoSchemas;

impl SchemaSource for ProtoSchemas {
    fn add_schema(&self, fqdn: &str, out: &mut BTreeMap<String, Value>) -> Option<String> {
        let d = ampybus_proto::message_descriptor(fqdn)?;
        add_message(&d, out);
        Some(component_name(fqdn))
    }
}

fn add_message(d: &MessageDescriptor, out: &mut BTreeMap<String, Value>) {
    let name = component_name(d.full_name());
    if out.contains_key(&name) {
        return;
    }
    // A placeholder first, so a recursive type refers to itself instead of looping.
    out.insert(name.clone(), Value::Null);
    let mut props = Map::new();
    for f in d.fields() {
        let mut s = if f.is_map() {
            let value = match f.kind() {
                Kind::Message(entry) => entry.map_entry_value_field().kind().clone(),
                other => other,
            };
            json!({"type": "object", "additionalProperties": kind_schema(value, out)})
        } else if f.is_list() {
            json!({"type": "array", "items": kind_schema(f.kind(), out)})
        } else {
            kind_schema(f.kind(), out)
        };
        if let Value::Object(m) = &mut s {
            // The field's `.proto` comment when it has one, after its name and number.
            let number = format!("field {} = {}", f.name(), f.number());
            let text = match ampybus_proto::doc(d.full_name(), Some(f.name())) {
                Some(doc) => format!("{number}: {doc}"),
                None => number,
            };
            m.insert("description".into(), json!(text));
        }
        props.insert(f.name().to_owned(), s);
    }
    out.insert(
        name,
        json!({
            "type": "object",
            "title": d.full_name(),
            "description": match ampybus_proto::doc(d.full_name(), None) {
                Some(doc) => format!("{doc}\n\nprotobuf message {} ({})", d.full_name(), d.parent_file().name()),
                None => format!("protobuf message {} ({})", d.full_name(), d.parent_file().name()),
            },
            "properties": props,
        }),
    );
}

fn kind_schema(kind: Kind, out: &mut BTreeMap<String, Value>) -> Value {
    match kind {
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Uint32 | Kind::Fixed32 => json!({"type": "integer", "minimum": 0}),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            json!({"type": "string", "format": "int64"})
        }
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Enum(e) => {
            json!({"type": "string", "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>()})
        }
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
            "google.protobuf.Duration" => json!({"type": "string"}),
            _ => {
                add_message(&m, out);
                json!({"$ref": format!("#/components/schemas/{}", component_name(m.full_name()))})
            }
        },
    }
}

/// The registry entry of a topic for `topics list|describe`: pattern, owner, schemas, tier,
/// retention, rate, consumers.
pub fn entry_info(e: &ampybus::registry::TopicEntry) -> Value {
    json!({
        "pattern": e.pattern.as_str(),
        "owner": e.owner,
        "schemas": e.schemas,
        "tier": e.tier.as_str(),
        "retention_days": e.retention_days,
        "max_rate": e.max_rate,
        "consumers": e.consumers,
    })
}
