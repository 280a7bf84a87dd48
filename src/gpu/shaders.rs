//! The WGSL sources, compiled into the binary from `shaders/*.wgsl`.

/// `shaders/<name>.wgsl` after `shaders/include/lanes.wgsl` (the lane-interleaved weight
/// layout's index functions, shared by the kernels that read f16 weight chunks).
macro_rules! with_lanes {
    ($name:literal) => {
        concat!(
            include_str!("../../shaders/include/lanes.wgsl"),
            include_str!(concat!("../../shaders/", $name, ".wgsl"))
        )
    };
}

/// Every shader by name. The name is the file stem under `shaders/`.
pub const ALL: &[(&str, &str)] = &[
    ("matmul", with_lanes!("matmul")),
    ("sample", include_str!("../../shaders/sample.wgsl")),
    ("softcap", include_str!("../../shaders/softcap.wgsl")),
    ("norm", include_str!("../../shaders/norm.wgsl")),
    (
        "elementwise",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    ("embed", with_lanes!("embed")),
    ("patch", include_str!("../../shaders/patch.wgsl")),
    ("rope", include_str!("../../shaders/rope.wgsl")),
    ("attention", include_str!("../../shaders/attention.wgsl")),
    ("conv", include_str!("../../shaders/conv.wgsl")),
    ("probe", include_str!("../../shaders/probe.wgsl")),
    ("quant", include_str!("../../shaders/quant.wgsl")),
];

/// Parse and validate `src` (the shader `name`) with naga under the capabilities every wgpu
/// backend but old GL has (`unpack2x16float` needs f16-in-f32 conversion); the error is
/// naga's message with the source location.
pub(crate) fn validate(
    name: &str,
    src: &str,
) -> Result<(naga::Module, naga::valid::ModuleInfo), String> {
    let module = naga::front::wgsl::parse_str(src)
        .map_err(|e| format!("{name}.wgsl: {}", e.emit_to_string(src)))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
    )
    .validate(&module)
    .map_err(|e| format!("{name}.wgsl: {}", e.emit_to_string(src)))?;
    Ok((module, info))
}

/// The source of the shader called `name`.
pub fn source(name: &str) -> Option<&'static str> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

#[cfg(test)]
mod tests {
    /// Every shader parses and validates with naga, without a GPU.
    #[test]
    fn all_shaders_validate() {
        for (name, src) in super::ALL {
            super::validate(name, src).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// The lane-interleaved layout's WGSL constants are the ones `lane_unit` writes with.
    #[test]
    fn lane_layout_constants_match() {
        use crate::gpu::tensor::{LANE_BLOCK_ROWS, LANE_GROUP_ROWS};
        let src = include_str!("../../shaders/include/lanes.wgsl");
        for (name, v) in [
            ("LANE_GROUP_ROWS", LANE_GROUP_ROWS),
            ("LANE_BLOCK_ROWS", LANE_BLOCK_ROWS),
        ] {
            let decl = format!("const {name}: u32 = {v}u;");
            assert!(src.contains(&decl), "lanes.wgsl lacks `{decl}`");
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
