//! The builder's folders are the pipeline, in layers (the order of the `mod` lines in
//! src/lib.rs): a module may use its own layer and the ones before it, never one
//! after it. This reads every source file's `crate::` paths and fails naming each
//! one that points the wrong way.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The layers, in order, as lib.rs declares them.
fn layers() -> Vec<String> {
    let lib = fs::read_to_string(src().join("lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| {
            // Whatever its visibility: `pub mod`, `pub(crate) mod` or `mod`.
            let l = l
                .strip_prefix("pub(crate) ")
                .or_else(|| l.strip_prefix("pub "))
                .unwrap_or(l);
            l.strip_prefix("mod ")?.strip_suffix(';')
        })
        .map(str::to_owned)
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `code` without comments and string literals, on one line, so that paths written
/// across lines or inside a multi-line `use` group are seen whole.
fn flattened(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                out.push(' ');
            }
            '/' if chars.peek() == Some(&'*') => {
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
                out.push(' ');
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if c == '"' && !escaped {
                        break;
                    }
                    escaped = c == '\\' && !escaped;
                }
                out.push_str("\"\"");
            }
            '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The first segment of each item of a use tree that starts at `rest`: `a::b` gives
/// `a`, `{a, b::{c, d}}` gives `a` and `b`.
fn tree_heads(rest: &str) -> Vec<String> {
    let rest = rest.trim_start();
    let Some(group) = rest.strip_prefix('{') else {
        let head: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        return vec![head];
    };
    let mut heads = Vec::new();
    let (mut depth, mut item) = (0, String::new());
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                heads.extend(tree_heads(&item));
                item.clear();
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    heads.extend(tree_heads(&item));
    heads.retain(|h| !h.is_empty());
    heads
}

/// The identifier `text` ends with (spaces before `::` allowed).
fn last_word(text: &str) -> String {
    let mut word: Vec<char> = text
        .trim_end()
        .chars()
        .rev()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    word.reverse();
    word.into_iter().collect()
}

/// The top-level module each path in `code` names: after `crate::`, and after as
/// many `super::` as lead from `depth` (how deep the file's module is) to the root.
fn crate_paths(code: &str, depth: usize) -> Vec<String> {
    let flat = flattened(code);
    let tokens: Vec<&str> = flat.split("::").collect();
    let mut found = Vec::new();
    for (n, before) in tokens
        .iter()
        .enumerate()
        .take(tokens.len().saturating_sub(1))
    {
        let word = last_word(before);
        let rest = tokens[n + 1..].join("::");
        if word == "crate" {
            found.extend(tree_heads(&rest));
        } else if word == "super" && depth > 0 {
            // Only where a run of `super::` starts: it climbs to the crate root when
            // it has as many steps as the file is deep.
            let continues =
                n > 0 && before.trim() == "super" && last_word(tokens[n - 1]) == "super";
            let ups = 1 + tokens[n + 1..]
                .iter()
                .take_while(|t| t.trim() == "super")
                .count();
            if !continues && ups >= depth {
                found.extend(tree_heads(&tokens[n + ups..].join("::")));
            }
        }
    }
    found.retain(|h| !h.is_empty() && h != "self");
    found
}

#[test]
fn no_module_uses_a_later_layer() {
    let layers = layers();
    assert!(
        layers.len() >= 8,
        "lib.rs declares too few layers: {layers:?}"
    );
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(src()).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs");
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(own) = layers.iter().position(|l| l == top) else {
            wrong.push(format!(
                "{}: `{top}` is not a layer of lib.rs; put it in one",
                rel.display()
            ));
            continue;
        };
        let code = fs::read_to_string(file).unwrap();
        // `support/mod.rs` is the module `support` (depth 1), `support/cmd.rs` and
        // `store/registry/mod.rs` depth 2, and so on.
        let parts = rel.components().count();
        let depth = if rel.file_name().is_some_and(|f| f == "mod.rs") {
            parts - 1
        } else {
            parts
        };
        if flattened(&code).contains("crate as ") {
            wrong.push(format!(
                "{}: `crate as` hides paths from this check",
                rel.display()
            ));
        }
        // An inline `mod tests { ... }` at the end is one module deeper.
        let (main, tests) = code
            .split_once("\n#[cfg(test)]\nmod tests {")
            .unwrap_or((&code, ""));
        let names = crate_paths(main, depth)
            .into_iter()
            .chain(crate_paths(tests, depth + 1));
        for name in names {
            match layers.iter().position(|l| *l == name) {
                Some(used) if used > own => wrong.push(format!(
                    "{}: `{top}` (layer {own}) uses `{name}` (layer {used})",
                    rel.display()
                )),
                Some(_) => {}
                None => wrong.push(format!("{}: `crate::{name}` is not a layer", rel.display())),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn paths_are_read_as_the_compiler_reads_them() {
    let code = "use crate::store::cache;\n// crate::cli in a comment\nlet s = \"crate::fleet\";\n/* crate::publish */\nuse crate::{\n    model,\n    support::{cmd, digest},\n    build,\n};\nlet x = crate::image::disk::f();\nlet y = crate\n    ::inventory::list();";
    assert_eq!(
        crate_paths(code, 1),
        ["store", "model", "support", "build", "image", "inventory"]
    );
    // From `support/cmd.rs` (depth 2), `super::super::cli` is the crate's `cli`;
    // `super::ui` is a sibling; from `support/mod.rs`, `super::cli` is the crate's.
    assert_eq!(crate_paths("use super::super::cli::run;", 2), ["cli"]);
    assert!(crate_paths("use super::ui::Ui;", 2).is_empty());
    assert_eq!(crate_paths("use super::cli;", 1), ["cli"]);
}
