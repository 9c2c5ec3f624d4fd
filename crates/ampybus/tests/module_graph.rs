//! No import cycles between modules, in every crate of the workspace that is checked here.
//!
//! The graph: one node per module (a file, or a directory's `mod.rs`); an edge from a module
//! to every module a path in it names — `crate::…`, `super::…`, `self::…`, or a child module's
//! name (`http::serve`) — resolved to the longest prefix that is a module. A module naming
//! one of its own ancestors is not an edge (a child lives inside its parent's context, as
//! `use super::*` says); everything else is, a parent naming its child included. Comments,
//! string literals and `#[cfg(test)] mod tests` blocks are not read. Method calls are not
//! imports and are not seen.
//!
//! A cycle fails the test with every edge inside it and the reference that made each.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose modules must not import each other in a cycle.
const CRATES: [&str; 6] = [
    "ampybus",
    "ampybus-cli",
    "ampybus-conformance",
    "ampybus-features",
    "ampybus-proto",
    "ampybus-py",
];

type ModPath = Vec<String>;

struct Module {
    path: ModPath,
    file: PathBuf,
    src: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn modules(src: &Path) -> Vec<Module> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files
        .into_iter()
        .filter(|f| !f.starts_with(src.join("bin")))
        .map(|file| {
            let rel = file.strip_prefix(src).unwrap().with_extension("");
            let mut path: ModPath = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if path.last().is_some_and(|l| l == "mod") {
                path.pop();
            }
            if path == ["lib"] || path == ["main"] {
                path.clear();
            }
            let text = std::fs::read_to_string(&file).unwrap();
            Module {
                path,
                file,
                src: strip(&text),
            }
        })
        .collect()
}

/// The source without comments, string and char literals, and the trailing test module.
fn strip(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == b'r'
            && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
            && (i == 0 || !is_ident(b[i - 1]))
        {
            // A raw string r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"'
                    && b[j + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|x| **x == b'#')
                        .count()
                        == hashes
                {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{1F600}'), else a lifetime.
            if b.get(i + 1) == Some(&b'\\') {
                let end = b[i + 2..]
                    .iter()
                    .position(|x| *x == b'\'')
                    .map(|p| i + 3 + p);
                i = end.unwrap_or(b.len());
                out.push_str("' '");
            } else if b.get(i + 2) == Some(&b'\'') {
                i += 3;
                out.push_str("' '");
            } else if let Some(len) = text[i + 1..].chars().next().map(char::len_utf8)
                && len > 1
                && b.get(i + 1 + len) == Some(&b'\'')
            {
                i += 2 + len;
                out.push_str("' '");
            } else {
                out.push('\'');
                i += 1;
            }
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Reads one identifier at `*i` (after spaces).
fn ident(b: &[u8], i: &mut usize) -> Option<String> {
    while *i < b.len() && b[*i].is_ascii_whitespace() {
        *i += 1;
    }
    let start = *i;
    while *i < b.len() && is_ident(b[*i]) {
        *i += 1;
    }
    (*i > start).then(|| String::from_utf8_lossy(&b[start..*i]).into_owned())
}

/// Consumes `::` at `*i` (after spaces).
fn colons(b: &[u8], i: &mut usize) -> bool {
    let mut j = *i;
    while j < b.len() && b[j].is_ascii_whitespace() {
        j += 1;
    }
    if b.get(j) == Some(&b':') && b.get(j + 1) == Some(&b':') {
        *i = j + 2;
        true
    } else {
        false
    }
}

/// Reads a path (and a `{…}` use tree after it) at `*i`, pushing every full path.
fn tree(b: &[u8], i: &mut usize, prefix: &[String], out: &mut Vec<ModPath>) {
    let mut path = prefix.to_vec();
    loop {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
        if b.get(*i) == Some(&b'{') {
            *i += 1;
            loop {
                while *i < b.len() && (b[*i].is_ascii_whitespace() || b[*i] == b',') {
                    *i += 1;
                }
                if *i >= b.len() || b[*i] == b'}' {
                    *i += 1;
                    return;
                }
                let before = *i;
                tree(b, i, &path, out);
                // Skip `as name` and anything else up to the next item.
                while *i < b.len() && b[*i] != b',' && b[*i] != b'}' {
                    *i += 1;
                }
                if *i == before {
                    *i += 1;
                }
            }
        }
        if b.get(*i) == Some(&b'*') {
            *i += 1;
            out.push(path);
            return;
        }
        match ident(b, i) {
            Some(id) => path.push(id),
            None => {
                out.push(path);
                return;
            }
        }
        if !colons(b, i) {
            out.push(path);
            return;
        }
    }
}

/// Every path a module names, made absolute.
fn references(m: &Module, children: &BTreeSet<String>) -> Vec<ModPath> {
    let b = m.src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !is_ident(b[i]) || (i > 0 && (is_ident(b[i - 1]) || b[i - 1] == b':')) {
            i += 1;
            continue;
        }
        let mut j = i;
        let first = ident(b, &mut j).unwrap();
        let mut base: Option<ModPath> = match first.as_str() {
            "crate" => Some(Vec::new()),
            "self" => Some(m.path.clone()),
            "super" => Some(m.path[..m.path.len().saturating_sub(1)].to_vec()),
            name if children.contains(name) => {
                let mut p = m.path.clone();
                p.push(name.to_owned());
                Some(p)
            }
            _ => None,
        };
        let Some(mut start) = base.take() else {
            i = j;
            continue;
        };
        if !colons(b, &mut j) {
            i = j;
            continue;
        }
        // `super::super::…`
        let mut k = j;
        while first == "super" && ident(b, &mut k).as_deref() == Some("super") && colons(b, &mut k)
        {
            start.pop();
            j = k;
        }
        let mut paths = Vec::new();
        tree(b, &mut j, &start, &mut paths);
        out.extend(paths);
        i = j.max(i + 1);
    }
    out
}

/// The longest prefix of `p` that is a module.
fn resolve<'a>(p: &ModPath, known: &'a BTreeSet<ModPath>) -> Option<&'a ModPath> {
    (0..=p.len())
        .rev()
        .find_map(|n| known.get(&p[..n].to_vec()))
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(nodes: &[ModPath], edges: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    struct T<'a> {
        edges: &'a BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<ModPath, usize>,
        low: BTreeMap<ModPath, usize>,
        stack: Vec<ModPath>,
        on: BTreeSet<ModPath>,
        next: usize,
        found: Vec<Vec<ModPath>>,
    }
    fn visit(t: &mut T<'_>, v: &ModPath) {
        t.index.insert(v.clone(), t.next);
        t.low.insert(v.clone(), t.next);
        t.next += 1;
        t.stack.push(v.clone());
        t.on.insert(v.clone());
        let succ: Vec<ModPath> = t
            .edges
            .get(v)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for w in succ {
            if !t.index.contains_key(&w) {
                visit(t, &w);
                let lw = t.low[&w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(&w) {
                let iw = t.index[&w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut c = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(&w);
                let done = &w == v;
                c.push(w);
                if done {
                    break;
                }
            }
            if c.len() > 1 {
                c.sort();
                t.found.push(c);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in nodes {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.found
}

fn name(p: &ModPath) -> String {
    if p.is_empty() {
        "crate".into()
    } else {
        p.join("::")
    }
}

/// The cycles of one crate's module graph, described.
fn crate_cycles(src: &Path) -> Vec<String> {
    let mods = modules(src);
    let known: BTreeSet<ModPath> = mods.iter().map(|m| m.path.clone()).collect();
    let mut edges: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    let mut why: BTreeMap<(ModPath, ModPath), String> = BTreeMap::new();
    for m in &mods {
        let children: BTreeSet<String> = known
            .iter()
            .filter(|k| k.len() == m.path.len() + 1 && k.starts_with(&m.path))
            .map(|k| k.last().unwrap().clone())
            .collect();
        for r in references(m, &children) {
            let Some(t) = resolve(&r, &known) else {
                continue;
            };
            if *t == m.path || m.path.starts_with(t) {
                continue;
            }
            edges.entry(m.path.clone()).or_default().insert(t.clone());
            why.entry((m.path.clone(), t.clone()))
                .or_insert_with(|| format!("{}: {}", m.file.display(), r.join("::")));
        }
    }
    let nodes: Vec<ModPath> = known.iter().cloned().collect();
    cycles(&nodes, &edges)
        .into_iter()
        .map(|c| {
            let inside: BTreeSet<&ModPath> = c.iter().collect();
            let mut s = format!("cycle among {} modules:", c.len());
            for a in &c {
                for b in edges
                    .get(a)
                    .into_iter()
                    .flatten()
                    .filter(|b| inside.contains(b))
                {
                    s += &format!(
                        "\n    {} -> {}   ({})",
                        name(a),
                        name(b),
                        why[&(a.clone(), b.clone())]
                    );
                }
            }
            s
        })
        .collect()
}

#[test]
fn no_module_imports_another_in_a_cycle() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut found = Vec::new();
    for c in CRATES {
        for cycle in crate_cycles(&crates.join(c).join("src")) {
            found.push(format!("crate {c}: {cycle}"));
        }
    }
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

/// The checker sees the kinds of reference it must, and ignores what it must.
#[test]
fn the_checker_finds_a_planted_cycle_and_ignores_comments_strings_and_ancestors() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("net")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub mod net;\n").unwrap();
    // a -> b through a nested use tree; b -> a only in a comment and a string.
    std::fs::write(src.join("a.rs"), "use crate::{x::Y, b::{C, d::E}};\n").unwrap();
    std::fs::write(
        src.join("b.rs"),
        "// crate::a::F\nconst S: &str = \"crate::a::G\";\nfn f() -> char { '{' }\n",
    )
    .unwrap();
    // A child naming its parent is no edge; the parent naming its child is.
    std::fs::write(src.join("net/mod.rs"), "mod wire;\npub use wire::Frame;\n").unwrap();
    std::fs::write(
        src.join("net/wire.rs"),
        "use super::*;\nuse super::super::a::Z;\n",
    )
    .unwrap();
    assert!(crate_cycles(src).is_empty(), "{:?}", crate_cycles(src));
    // b -> a for real: a cycle a <-> b.
    std::fs::write(
        src.join("b.rs"),
        "fn f() { let _ = crate::a::G; }\n#[cfg(test)]\nmod tests {\n    use crate::net::X;\n}\n",
    )
    .unwrap();
    let found = crate_cycles(src);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("a -> b") && found[0].contains("b -> a"),
        "{}",
        found[0]
    );
    // super::super from a grandchild, and a parent's re-export of its child, make a cycle
    // net -> net::wire -> a -> (through b) … here: net::wire -> a, a -> net.
    std::fs::write(src.join("b.rs"), "").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::net::Frame;\n").unwrap();
    let found = crate_cycles(src);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("net::wire -> a"), "{}", found[0]);
}
