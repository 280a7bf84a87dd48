//! Parsing PaliGemma's `detect …` / `segment …` answers into objects.
//!
//! An answer is a list of objects separated by ` ; `, each four location tokens
//! `<locNNNN>` (`y_min, x_min, y_max, x_max`, bins of 1/1024 of the image side), optionally
//! sixteen mask tokens `<segNNN>` (VQ-VAE codebook indices, a 4×4 grid row by row), then a
//! label:
//!
//! ```text
//! <loc0267><loc0099><loc0601><loc0252> cat ; <loc0010><loc0020><loc0500><loc0700><seg012>…<seg101> dog
//! ```
//!
//! The parser never fails: it works on whatever text a runtime printed (text before the first
//! token is ignored, labels may contain spaces or be missing) and reports each malformed
//! object as invalid with a reason (fewer or more than 4 locations, a token out of range or
//! cut off, an empty box, a run of 1–15 or more than 16 mask tokens). A new object starts at
//! a `;`, or at a location token following a label, a mask token or four location tokens.

use serde::Serialize;

/// Number of mask tokens of one object (a 4×4 grid of codebook indices).
pub const SEG_TOKENS: usize = 16;
/// Location tokens are `<loc0000>` … `<loc1023>`: bins of 1/1024 of the image side.
pub const LOC_BINS: u32 = 1024;
/// Mask tokens are `<seg000>` … `<seg127>`.
pub const SEG_CODES: u32 = 128;

/// An axis-aligned box in image pixels (`x` to the right, `y` down; `x_min = loc / 1024 ×
/// width` and so on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct BBox {
    /// Left edge.
    pub x_min: f32,
    /// Top edge.
    pub y_min: f32,
    /// Right edge.
    pub x_max: f32,
    /// Bottom edge.
    pub y_max: f32,
}

impl BBox {
    /// The box as whole pixels `[x0, y0, x1, y1]` (columns `x0..x1`, rows `y0..y1`): each edge
    /// truncated, like big_vision's `int(y * H)`, and clipped to a `width × height` image. The
    /// rectangle is empty when `x1 <= x0` or `y1 <= y0`.
    pub fn pixel_rect(&self, width: u32, height: u32) -> [u32; 4] {
        // `as` saturates: negative and NaN edges become 0.
        let clip = |v: f32, max: u32| (v as u32).min(max);
        [
            clip(self.x_min, width),
            clip(self.y_min, height),
            clip(self.x_max, width),
            clip(self.y_max, height),
        ]
    }
}

/// One object of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// The label after the tokens, trimmed (empty when there is none).
    pub label: String,
    /// The box in pixels (all zeros when the location tokens are missing or malformed).
    pub bbox: BBox,
    /// Whether the object is well formed: four location tokens in range with
    /// `y_max > y_min` and `x_max > x_min`, and zero or sixteen mask tokens in range.
    pub valid: bool,
    /// Why the object is invalid.
    pub reason: Option<String>,
    /// The sixteen mask codes, when present and well formed.
    pub seg_codes: Option<[u32; SEG_TOKENS]>,
}

/// A lexical piece of the answer.
enum Piece<'a> {
    /// `<locNNNN>`, or why it is malformed.
    Loc(Result<u32, String>),
    /// `<segNNN>`, or why it is malformed.
    Seg(Result<u32, String>),
    Text(&'a str),
}

/// Read a `<loc…>` / `<seg…>` token at the start of `s`: its piece and length, or `None`
/// when `s` does not start with one.
fn token(s: &str) -> Option<(Piece<'_>, usize)> {
    let (kind, digits_want, max) = if s.starts_with("<loc") {
        ("loc", 4, LOC_BINS)
    } else if s.starts_with("<seg") {
        ("seg", 3, SEG_CODES)
    } else {
        return None;
    };
    let rest = &s[4..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let value = match rest.as_bytes().get(digits) {
        Some(b'>') => {
            let raw = &s[..4 + digits + 1];
            match rest[..digits].parse::<u32>() {
                Ok(v) if digits == digits_want && v < max => Ok(v),
                Ok(_) if digits == digits_want => Err(format!(
                    "`{raw}` is out of range (<{kind}{:0w$}> .. <{kind}{}>)",
                    0,
                    max - 1,
                    w = digits_want
                )),
                _ => Err(format!("malformed token `{raw}`")),
            }
        }
        None => Err(format!("truncated token `{s}`")),
        Some(_) => return None,
    };
    let len = if value.as_ref().is_err_and(|e| e.starts_with("truncated")) {
        s.len()
    } else {
        4 + digits + 1
    };
    let piece = if kind == "loc" {
        Piece::Loc(value)
    } else {
        Piece::Seg(value)
    };
    Some((piece, len))
}

fn lex(text: &str) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut start = 0; // start of pending text
    let mut i = 0;
    while let Some(off) = text[i..].find('<') {
        let at = i + off;
        match token(&text[at..]) {
            Some((piece, len)) => {
                if start < at {
                    pieces.push(Piece::Text(&text[start..at]));
                }
                pieces.push(piece);
                i = at + len;
                start = i;
            }
            None => i = at + 1,
        }
    }
    if start < text.len() {
        pieces.push(Piece::Text(&text[start..]));
    }
    pieces
}

#[derive(PartialEq)]
enum Phase {
    Locs,
    Segs,
    Label,
}

struct Draft {
    locs: Vec<Option<u32>>,
    segs: Vec<Option<u32>>,
    label: String,
    errors: Vec<String>,
    phase: Phase,
}

impl Draft {
    fn new(phase: Phase) -> Self {
        Draft {
            locs: Vec::new(),
            segs: Vec::new(),
            label: String::new(),
            errors: Vec::new(),
            phase,
        }
    }

    fn finish(mut self, width: u32, height: u32) -> Object {
        let mut bbox = BBox::default();
        let locs: Vec<u32> = self.locs.iter().flatten().copied().collect();
        if self.locs.len() != 4 {
            self.errors.push(format!(
                "expected 4 <locNNNN> tokens, found {}",
                self.locs.len()
            ));
        } else if let [y0, x0, y1, x1] = locs[..] {
            let (w, h) = (width as f32, height as f32);
            let at = |v: u32, size: f32| v as f32 / LOC_BINS as f32 * size;
            bbox = BBox {
                x_min: at(x0, w),
                y_min: at(y0, h),
                x_max: at(x1, w),
                y_max: at(y1, h),
            };
            if y1 <= y0 {
                self.errors.push(format!(
                    "empty box: y_max <loc{y1:04}> <= y_min <loc{y0:04}>"
                ));
            }
            if x1 <= x0 {
                self.errors.push(format!(
                    "empty box: x_max <loc{x1:04}> <= x_min <loc{x0:04}>"
                ));
            }
        }
        let mut seg_codes = None;
        match self.segs.len() {
            0 => {}
            SEG_TOKENS => {
                let codes: Vec<u32> = self.segs.iter().flatten().copied().collect();
                seg_codes = codes.try_into().ok();
            }
            n if n < SEG_TOKENS => self.errors.push(format!(
                "truncated mask: {n} of {SEG_TOKENS} <segNNN> tokens"
            )),
            n => self
                .errors
                .push(format!("{n} <segNNN> tokens, expected {SEG_TOKENS}")),
        }
        let valid = self.errors.is_empty();
        Object {
            label: self.label.trim().to_string(),
            bbox,
            valid,
            reason: (!valid).then(|| self.errors.join("; ")),
            seg_codes: if valid { seg_codes } else { None },
        }
    }
}

/// Parse an answer to `detect …` / `segment …` for an image of `width × height` pixels into
/// its objects, valid or not, in order. Text with no location or mask token gives no object.
pub fn parse_answer(text: &str, width: u32, height: u32) -> Vec<Object> {
    let mut objects = Vec::new();
    let mut draft: Option<Draft> = None;
    let finish = |d: Option<Draft>, objects: &mut Vec<Object>| {
        if let Some(d) = d {
            objects.push(d.finish(width, height));
        }
    };
    for piece in lex(text) {
        match piece {
            Piece::Loc(v) => {
                if draft
                    .as_ref()
                    .is_some_and(|d| d.phase != Phase::Locs || d.locs.len() == 4)
                {
                    finish(draft.take(), &mut objects);
                }
                let d = draft.get_or_insert_with(|| Draft::new(Phase::Locs));
                match v {
                    Ok(v) => d.locs.push(Some(v)),
                    Err(e) => {
                        d.locs.push(None);
                        d.errors.push(e);
                    }
                }
            }
            Piece::Seg(v) => {
                if draft.as_ref().is_some_and(|d| d.phase == Phase::Label) {
                    finish(draft.take(), &mut objects);
                }
                let d = draft.get_or_insert_with(|| Draft::new(Phase::Segs));
                d.phase = Phase::Segs;
                match v {
                    Ok(v) => d.segs.push(Some(v)),
                    Err(e) => {
                        d.segs.push(None);
                        d.errors.push(e);
                    }
                }
            }
            Piece::Text(t) => {
                for (i, part) in t.split(';').enumerate() {
                    if i > 0 {
                        finish(draft.take(), &mut objects);
                    }
                    if let Some(d) = draft.as_mut() {
                        d.label.push_str(part);
                        if !part.trim().is_empty() {
                            d.phase = Phase::Label;
                        }
                    }
                }
            }
        }
    }
    finish(draft, &mut objects);
    objects
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locs(v: [u32; 4]) -> String {
        v.iter().map(|l| format!("<loc{l:04}>")).collect()
    }

    fn segs(codes: &[u32]) -> String {
        codes.iter().map(|c| format!("<seg{c:03}>")).collect()
    }

    #[test]
    fn two_detections() {
        let text =
            "<loc0267><loc0099><loc0601><loc0252> cat ; <loc0010><loc0020><loc0500><loc1023> dog";
        let objs = parse_answer(text, 451, 300);
        assert_eq!(objs.len(), 2);
        let cat = &objs[0];
        assert!(cat.valid, "{:?}", cat.reason);
        assert_eq!(cat.label, "cat");
        assert_eq!(
            cat.bbox,
            BBox {
                x_min: 99.0 / 1024.0 * 451.0,
                y_min: 267.0 / 1024.0 * 300.0,
                x_max: 252.0 / 1024.0 * 451.0,
                y_max: 601.0 / 1024.0 * 300.0,
            }
        );
        assert_eq!(cat.seg_codes, None);
        assert_eq!(objs[1].label, "dog");
        assert_eq!(objs[1].bbox.x_max, 1023.0 / 1024.0 * 451.0);
        assert_eq!(objs[1].bbox.pixel_rect(451, 300), [8, 2, 450, 146]);
    }

    #[test]
    fn segmentation_with_codes_and_spaced_label() {
        let codes: Vec<u32> = (0..16).map(|i| i * 8 + 1).collect();
        let text = format!("{}{} big black dog", locs([10, 20, 500, 700]), segs(&codes));
        let objs = parse_answer(&text, 1024, 512);
        assert_eq!(objs.len(), 1);
        assert!(objs[0].valid, "{:?}", objs[0].reason);
        assert_eq!(objs[0].label, "big black dog");
        assert_eq!(objs[0].seg_codes.unwrap().to_vec(), codes);
        assert_eq!(objs[0].bbox.x_min, 20.0);
        assert_eq!(objs[0].bbox.y_max, 250.0);
        // Whitespace between the two runs is allowed.
        let spaced = format!("{} {} cat", locs([10, 20, 500, 700]), segs(&codes));
        assert!(parse_answer(&spaced, 10, 10)[0].seg_codes.is_some());
    }

    #[test]
    fn missing_label_and_surrounding_text() {
        let text = format!(
            "Sure! Here it is: {} ;{} fish.",
            locs([1, 2, 3, 4]),
            locs([5, 6, 7, 8])
        );
        let objs = parse_answer(&text, 100, 100);
        assert_eq!(objs.len(), 2);
        assert!(objs[0].valid && objs[0].label.is_empty());
        assert!(objs[1].valid);
        assert_eq!(objs[1].label, "fish.");
        // Objects without a `;` between them still split at the next location token.
        let text = format!("{} cat {} dog", locs([1, 2, 3, 4]), locs([5, 6, 7, 8]));
        let labels: Vec<_> = parse_answer(&text, 10, 10)
            .into_iter()
            .map(|o| o.label)
            .collect();
        assert_eq!(labels, ["cat", "dog"]);
    }

    #[test]
    fn garbage_and_empty_give_no_objects() {
        for text in [
            "",
            "   ",
            "no objects here",
            "a <b> c ; d <locx> <segment>",
            ";;;",
        ] {
            assert!(parse_answer(text, 10, 10).is_empty(), "{text:?}");
        }
    }

    fn only(text: &str) -> Object {
        let objs = parse_answer(text, 640, 480);
        assert_eq!(objs.len(), 1, "{text:?}: {objs:?}");
        objs.into_iter().next().unwrap()
    }

    fn reason(text: &str) -> String {
        let o = only(text);
        assert!(!o.valid, "{text:?} should be invalid");
        o.reason.unwrap()
    }

    #[test]
    fn malformed_objects_are_reported() {
        assert!(reason("<loc0001><loc0002><loc0003> cat")
            .contains("expected 4 <locNNNN> tokens, found 3"));
        assert!(reason("<loc0001><loc1024><loc0003><loc0009> cat")
            .contains("`<loc1024>` is out of range"));
        assert!(
            reason("<loc0001><loc12><loc0003><loc0009> cat").contains("malformed token `<loc12>`")
        );
        assert!(reason("<loc0500><loc0002><loc0400><loc0009> cat")
            .contains("y_max <loc0400> <= y_min <loc0500>"));
        assert!(reason("<loc0001><loc0009><loc0400><loc0009> cat").contains("x_max"));
        let seg7 = format!("{}{} cat", locs([1, 2, 3, 4]), segs(&[1; 7]));
        assert!(reason(&seg7).contains("truncated mask: 7 of 16"));
        let seg17 = format!("{}{} cat", locs([1, 2, 3, 4]), segs(&[1; 17]));
        assert!(reason(&seg17).contains("17 <segNNN> tokens"));
        let bad_seg = format!("{}{}<seg128> cat", locs([1, 2, 3, 4]), segs(&[1; 15]));
        assert!(reason(&bad_seg).contains("`<seg128>` is out of range"));
        let o = only(&bad_seg);
        assert_eq!(o.seg_codes, None);
        assert_eq!(o.label, "cat");
    }

    #[test]
    fn truncated_generation() {
        // The answer stops in the middle of a token, or after a partial run.
        assert!(reason("<loc0001><loc0002><loc00").contains("truncated token `<loc00`"));
        assert!(reason("<loc0001><loc0002><loc0003><loc0004><seg001><se").contains("truncated"));
        let objs = parse_answer(
            &format!("{} cat ; <loc0001><loc0", locs([1, 2, 3, 4])),
            10,
            10,
        );
        assert_eq!(objs.len(), 2);
        assert!(objs[0].valid && !objs[1].valid);
        // A mask run without locations.
        assert!(reason(&segs(&[3; 16])).contains("found 0"));
    }

    #[test]
    fn extra_locations_start_a_new_object() {
        let objs = parse_answer("<loc0001><loc0002><loc0003><loc0004><loc0005> cat", 10, 10);
        assert_eq!(objs.len(), 2);
        assert!(objs[0].valid && objs[0].label.is_empty());
        assert!(!objs[1].valid && objs[1].label == "cat");
    }

    /// Random mixes of token fragments never panic, and every valid object is a proper box
    /// inside the image.
    #[test]
    fn random_fragments_never_panic() {
        const BITS: [&str; 16] = [
            "<loc",
            "<seg",
            "0",
            "1023",
            "99",
            ">",
            " ",
            " ; ",
            "cat",
            "<",
            "é",
            "<loc0100>",
            "<loc0900>",
            "<seg005>",
            "<seg127>",
            ";",
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..3000 {
            let mut text = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            for _ in 0..(state % 40) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push_str(BITS[(state % 16) as usize]);
            }
            for o in parse_answer(&text, 640, 480) {
                if o.valid {
                    let b = o.bbox;
                    assert!(
                        0.0 <= b.x_min && b.x_min < b.x_max && b.x_max < 640.0,
                        "{text:?}"
                    );
                    assert!(
                        0.0 <= b.y_min && b.y_min < b.y_max && b.y_max < 480.0,
                        "{text:?}"
                    );
                } else {
                    assert!(o.reason.is_some() && o.seg_codes.is_none());
                }
            }
        }
    }

    #[test]
    fn pixel_rect_truncates_and_clips() {
        let b = BBox {
            x_min: 2.9,
            y_min: -1.0,
            x_max: 500.5,
            y_max: 14.6,
        };
        assert_eq!(b.pixel_rect(451, 300), [2, 0, 451, 14]);
    }
}
