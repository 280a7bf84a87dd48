//! The WGSL sources, compiled into the binary from `shaders/*.wgsl`.

/// Every shader by name. The name is the file stem under `shaders/`.
pub const ALL: &[(&str, &str)] = &[
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("sample", include_str!("../../shaders/sample.wgsl")),
    ("softcap", include_str!("../../shaders/softcap.wgsl")),
    ("norm", include_str!("../../shaders/norm.wgsl")),
    (
        "elementwise",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    ("embed", include_str!("../../shaders/embed.wgsl")),
    ("patch", include_str!("../../shaders/patch.wgsl")),
    ("rope", include_str!("../../shaders/rope.wgsl")),
    ("attention", include_str!("../../shaders/attention.wgsl")),
    ("conv", include_str!("../../shaders/conv.wgsl")),
    ("probe", include_str!("../../shaders/probe.wgsl")),
    ("quant", include_str!("../../shaders/quant.wgsl")),
];

/// The source of the shader called `name`.
pub fn source(name: &str) -> Option<&'static str> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

#[cfg(test)]
mod tests {
    /// Every shader parses and validates with naga, without a GPU, under the capabilities
    /// every wgpu backend but old GL has (`unpack2x16float` needs f16-in-f32 conversion).
    #[test]
    fn all_shaders_validate() {
        for (name, src) in super::ALL {
            let module = naga::front::wgsl::parse_str(src)
                .unwrap_or_else(|e| panic!("{name}.wgsl: {}", e.emit_to_string(src)));
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}.wgsl: {}", e.emit_to_string(src)));
        }
    }

    /// Every file under `shaders/` is registered.
    #[test]
    fn every_file_is_registered() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "wgsl") {
                let stem = path.file_stem().unwrap().to_str().unwrap();
                assert!(
                    super::source(stem).is_some(),
                    "{stem}.wgsl is not in shaders::ALL"
                );
            }
        }
    }
}
