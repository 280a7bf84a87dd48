//! The task picker's model: which PaliGemma task the user chose and its fields, turned into
//! the prompt prefix the checkpoints were trained on (`caption en`, `answer en …`,
//! `detect a ; b`, `segment …`, `ocr`), and back from a prefix given on the command line.

/// The tasks the picker offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// `caption LANG`: describe the image.
    Caption,
    /// `answer LANG QUESTION`: visual question answering.
    Ask,
    /// `detect A ; B`: boxes around objects.
    Detect,
    /// `segment A`: a mask and box (needs the VQ-VAE mask decoder).
    Segment,
    /// `ocr`: read the text in the image.
    Ocr,
    /// Any prompt, sent as typed.
    Free,
}

impl TaskKind {
    /// Every task, in picker order.
    pub const ALL: [TaskKind; 6] = [
        TaskKind::Caption,
        TaskKind::Ask,
        TaskKind::Detect,
        TaskKind::Segment,
        TaskKind::Ocr,
        TaskKind::Free,
    ];

    /// The label shown in the picker.
    pub fn label(self) -> &'static str {
        match self {
            TaskKind::Caption => "Caption",
            TaskKind::Ask => "Ask",
            TaskKind::Detect => "Detect",
            TaskKind::Segment => "Segment",
            TaskKind::Ocr => "OCR",
            TaskKind::Free => "Free text",
        }
    }

    /// A one-line explanation shown under the picker.
    pub fn help(self) -> &'static str {
        match self {
            TaskKind::Caption => "Describe the image in the chosen language.",
            TaskKind::Ask => "Answer a question about the image.",
            TaskKind::Detect => "Draw boxes around objects; several objects are separated by `;`.",
            TaskKind::Segment => {
                "Outline an object. Its mask needs big_vision's mask decoder vae-oid.npz \
                 (gs://big_vision/paligemma/vae-oid.npz, or the google/paligemma-hf \
                 Hugging Face space): open it with \"Mask decoder…\"."
            }
            TaskKind::Ocr => "Read the text in the image.",
            TaskKind::Free => "Send the prompt exactly as typed.",
        }
    }
}

/// The languages offered for captions and answers (the PaliGemma mix checkpoints' codes).
pub const LANGUAGES: [&str; 12] = [
    "en", "de", "es", "fr", "it", "ja", "ko", "nl", "pt", "ru", "uk", "zh",
];

/// The picker's state: the chosen task and what the user typed for each.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    /// The chosen task.
    pub kind: TaskKind,
    /// Language code of captions and answers.
    pub language: String,
    /// The question of [`TaskKind::Ask`].
    pub question: String,
    /// The objects of [`TaskKind::Detect`], `;`-separated.
    pub objects: String,
    /// The object of [`TaskKind::Segment`].
    pub segment: String,
    /// The prompt of [`TaskKind::Free`].
    pub free: String,
}

impl Default for TaskState {
    fn default() -> Self {
        TaskState {
            kind: TaskKind::Detect,
            language: "en".into(),
            question: String::new(),
            objects: String::new(),
            segment: String::new(),
            free: String::new(),
        }
    }
}

impl TaskState {
    /// The prompt for the chosen task, or why it cannot be run yet.
    pub fn prompt(&self) -> Result<String, String> {
        let lang = self.language.trim();
        let lang = if lang.is_empty() { "en" } else { lang };
        match self.kind {
            TaskKind::Caption => Ok(format!("caption {lang}")),
            TaskKind::Ask => {
                let q = self.question.trim();
                if q.is_empty() {
                    Err("type a question".into())
                } else {
                    Ok(format!("answer {lang} {q}"))
                }
            }
            TaskKind::Detect => {
                let objects: Vec<&str> = self
                    .objects
                    .split(';')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .collect();
                if objects.is_empty() {
                    Err("type one or more objects to detect".into())
                } else {
                    Ok(format!("detect {}", objects.join(" ; ")))
                }
            }
            TaskKind::Segment => {
                let o = self.segment.trim();
                if o.is_empty() {
                    Err("type an object to segment".into())
                } else {
                    Ok(format!("segment {o}"))
                }
            }
            TaskKind::Ocr => Ok("ocr".into()),
            TaskKind::Free => {
                let p = self.free.trim();
                if p.is_empty() {
                    Err("type a prompt".into())
                } else {
                    Ok(p.to_string())
                }
            }
        }
    }

    /// The picker state that writes `prompt` (a prompt from the command line): a known
    /// prefix selects its task and fills its field, anything else is free text.
    pub fn from_prompt(prompt: &str) -> Self {
        let mut state = TaskState::default();
        let p = prompt.trim();
        let (head, rest) = p.split_once(' ').unwrap_or((p, ""));
        let rest = rest.trim();
        let is_lang = |s: &str| !s.is_empty() && s.len() <= 5 && !s.contains(char::is_whitespace);
        match head {
            "caption" if is_lang(rest) => {
                state.kind = TaskKind::Caption;
                state.language = rest.into();
            }
            "answer" | "question" => {
                let (lang, q) = rest.split_once(' ').unwrap_or(("", ""));
                if is_lang(lang) && !q.trim().is_empty() {
                    state.kind = TaskKind::Ask;
                    state.language = lang.into();
                    state.question = q.trim().into();
                } else {
                    state.kind = TaskKind::Free;
                    state.free = p.into();
                }
            }
            "detect" if !rest.is_empty() => {
                state.kind = TaskKind::Detect;
                state.objects = rest.into();
            }
            "segment" if !rest.is_empty() => {
                state.kind = TaskKind::Segment;
                state.segment = rest.into();
            }
            "ocr" if rest.is_empty() => state.kind = TaskKind::Ocr,
            _ => {
                state.kind = TaskKind::Free;
                state.free = p.into();
            }
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(kind: TaskKind, f: impl FnOnce(&mut TaskState)) -> TaskState {
        let mut s = TaskState {
            kind,
            ..Default::default()
        };
        f(&mut s);
        s
    }

    #[test]
    fn prompts_follow_the_paligemma_prefixes() {
        let caption = with(TaskKind::Caption, |s| s.language = "de".into());
        assert_eq!(caption.prompt().unwrap(), "caption de");
        let ask = with(TaskKind::Ask, |s| s.question = " how many shapes? ".into());
        assert_eq!(ask.prompt().unwrap(), "answer en how many shapes?");
        let detect = with(TaskKind::Detect, |s| s.objects = "circle;  square ;".into());
        assert_eq!(detect.prompt().unwrap(), "detect circle ; square");
        let segment = with(TaskKind::Segment, |s| s.segment = "cat".into());
        assert_eq!(segment.prompt().unwrap(), "segment cat");
        assert_eq!(with(TaskKind::Ocr, |_| ()).prompt().unwrap(), "ocr");
        let free = with(TaskKind::Free, |s| s.free = "describe en\n".into());
        assert_eq!(free.prompt().unwrap(), "describe en");
    }

    #[test]
    fn empty_fields_say_what_is_missing() {
        assert_eq!(
            with(TaskKind::Detect, |s| s.objects = " ; ".into()).prompt(),
            Err("type one or more objects to detect".into())
        );
        assert!(with(TaskKind::Ask, |_| ()).prompt().is_err());
        assert!(with(TaskKind::Segment, |_| ()).prompt().is_err());
        assert!(with(TaskKind::Free, |_| ()).prompt().is_err());
    }

    #[test]
    fn a_prompt_selects_its_task_and_round_trips() {
        for prompt in [
            "caption es",
            "answer en how many shapes?",
            "detect circle ; square",
            "segment red circle",
            "ocr",
            "what is this",
        ] {
            let state = TaskState::from_prompt(prompt);
            assert_eq!(state.prompt().unwrap(), prompt, "{state:?}");
        }
        assert_eq!(TaskState::from_prompt("detect cat").kind, TaskKind::Detect);
        assert_eq!(TaskState::from_prompt("answer en").kind, TaskKind::Free);
        assert_eq!(TaskState::from_prompt("ocr please").kind, TaskKind::Free);
    }
}
