//! The README's "Embedding the engine in your app" code is the Studio's own: each of its
//! `rust` blocks starts with `// studio/src/FILE: ...`, and every other line of the block
//! (trimmed; `// …` marks what is left out) must still be a line of that file.

use std::path::Path;

#[test]
fn readme_embedding_code_is_the_apps_own() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut checked = 0;
    for block in readme.split("```rust\n").skip(1) {
        let code = block.split("```").next().unwrap();
        let mut lines = code.lines();
        let Some(file) = lines
            .next()
            .and_then(|l| l.strip_prefix("// "))
            .and_then(|l| l.split_once(':'))
            .map(|(f, _)| f)
            .filter(|f| f.starts_with("studio/src/"))
        else {
            continue;
        };
        let source = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("README names {file}: {e}"));
        let source_lines: Vec<&str> = source.lines().map(str::trim).collect();
        for line in lines
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != "// …")
        {
            assert!(
                source_lines.contains(&line),
                "README's code from {file} has a line that is not in it: {line:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} README lines were checked");
}
