//! The builder's folders are the pipeline, in layers (the order of the `pub mod` lines
//! in src/lib.rs): a module may use its own layer and the ones before it, never one
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
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
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

/// The first segment of every `crate::` path in `code` (comments left out), with
/// its line number; `crate::{a, b::c}` gives `a` and `b`.
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let line = line.split("//").next().unwrap_or_default();
        for (at, _) in line.match_indices("crate::") {
            let rest = &line[at + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .collect(),
                None => vec![rest],
            };
            for name in names {
                let name: String = name
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push((n + 1, name));
                }
            }
        }
    }
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
        for (line, name) in crate_paths(&code) {
            match layers.iter().position(|l| *l == name) {
                Some(used) if used > own => wrong.push(format!(
                    "{}:{line}: `{top}` (layer {own}) uses `{name}` (layer {used})",
                    rel.display()
                )),
                Some(_) => {}
                None => wrong.push(format!(
                    "{}:{line}: `crate::{name}` is not a layer",
                    rel.display()
                )),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn paths_are_read_as_the_compiler_reads_them() {
    let code = "use crate::store::cache;\n// crate::cli in a comment\nuse crate::{model, support::cmd};\nlet x = crate::image::disk::f();";
    let names: Vec<String> = crate_paths(code).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["store", "model", "support", "image"]);
}
