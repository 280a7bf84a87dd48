//! The `generate` command's request loops: single requests (several prompts about the same
//! images share their features) and `--batch` files streamed through the scheduler.

use std::io::Write;

use anyhow::{Context, Result};
use paligemma::generate::{
    GenerateOptions, ImageInput, Prompt, Request, Scheduler, SchedulerEvent, SchedulerOptions,
};
use paligemma::model::{CheckpointKind, PaliGemma};
use paligemma::tasks::process_answer;

use crate::TaskArgs;

/// `--shard I/N`: lines whose index modulo `n` is `i`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shard {
    i: usize,
    n: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("{s:?} is not I/N with 0 <= I < N, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (i, n): (usize, usize) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if i >= n {
            return Err(bad());
        }
        Ok(Shard { i, n })
    }
}

impl Shard {
    fn takes(&self, index: usize) -> bool {
        index % self.n == self.i
    }
}

/// What a single request's JSON object says about the checkpoint and the request.
pub(crate) struct About<'a> {
    /// The checkpoint's kind (`"model"` in the JSON object).
    pub kind: &'a CheckpointKind,
    /// Why the request may not suit the checkpoint (`"warnings"`).
    pub warnings: &'a [String],
}

/// Run one request, streaming its text (or printing its JSON object, with `about`), then any
/// detection or segmentation outputs.
pub(crate) fn answer(
    model: &PaliGemma,
    request: Request,
    image: &std::path::Path,
    tasks: &TaskArgs,
    json: bool,
    about: &About,
) -> Result<()> {
    let mut stdout = std::io::stdout();
    let mut on_text = |t: &str| {
        if !json {
            let _ = write!(stdout, "{t}");
            let _ = stdout.flush();
        }
        true
    };
    let mut result = model.run_one(request, &mut on_text)?;
    result.timings.load_s = model.load_seconds();
    let report = match tasks.options() {
        Some(opts) => Some(process_answer(&result.text, image, &opts, || {
            Ok(model.gpu().clone())
        })?),
        None => None,
    };
    if json {
        let mut value = serde_json::to_value(&result).context("serialising the result")?;
        if let Some(r) = &report {
            value["objects"] = serde_json::to_value(&r.objects)?;
        }
        value["model"] = serde_json::to_value(about.kind)?;
        value["warnings"] = serde_json::to_value(about.warnings)?;
        println!("{value}");
    } else {
        println!();
        if let Some(r) = &report {
            print!("{}", r.summary());
        }
        log::info!("timings: {:?}", result.timings);
    }
    Ok(())
}

/// Some lines of a `--batch` file failed (each was reported in its place): exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("some requests failed")]
pub(crate) struct PartialFailure;

/// A `--batch` file streamed through the scheduler.
pub(crate) struct BatchJob<'a> {
    pub(crate) file: &'a std::path::Path,
    pub(crate) shard: Option<Shard>,
    pub(crate) json: bool,
    pub(crate) options: GenerateOptions,
}

/// What a line of a batch file gave.
type LineResult = std::result::Result<paligemma::generate::Generation, String>;

impl BatchJob<'_> {
    /// Feed the lines to the scheduler as slots free up, so memory stays flat however long
    /// the file is, and print each answer in input order as soon as it and all before it are
    /// done. Returns how many lines failed.
    pub(crate) fn run(
        &self,
        model: &PaliGemma,
        opts: SchedulerOptions,
        input: impl std::io::BufRead,
    ) -> Result<usize> {
        let mut scheduler = Scheduler::new(model, opts)?;
        let mut lines = input.lines().enumerate();
        let mut exhausted = false;
        let mut ready: std::collections::BTreeMap<usize, LineResult> = Default::default();
        let mut order = std::collections::HashMap::new();
        let (mut taken, mut printed, mut failed) = (0usize, 0usize, 0usize);
        let mut stdout = std::io::stdout().lock();
        loop {
            while !exhausted && scheduler.queued() < opts.max_sequences {
                let Some((index, line)) = lines.next() else {
                    exhausted = true;
                    break;
                };
                let line = line.with_context(|| format!("reading {}", self.file.display()))?;
                if self.shard.is_some_and(|s| !s.takes(index)) || line.trim().is_empty() {
                    continue;
                }
                let at = taken;
                taken += 1;
                match self.request(model, index, &line) {
                    Ok(request) => match scheduler.submit(request) {
                        Ok(id) => {
                            order.insert(id, at);
                        }
                        Err(e) => {
                            ready.insert(at, Err(self.located(index, &e.to_string())));
                        }
                    },
                    Err(e) => {
                        ready.insert(at, Err(e));
                    }
                }
            }
            if !scheduler.is_idle() {
                for event in scheduler.step()? {
                    if let SchedulerEvent::Finished { id, result } = event {
                        let at = order.remove(&id).expect("every request was numbered");
                        let result = result.map_err(|e| format!("request {}: {e}", at + 1));
                        ready.insert(at, result);
                    }
                }
            }
            while let Some(result) = ready.remove(&printed) {
                printed += 1;
                failed += result.is_err() as usize;
                self.print(&mut stdout, model, result)?;
            }
            if exhausted && scheduler.is_idle() && ready.is_empty() {
                return Ok(failed);
            }
        }
    }

    fn located(&self, index: usize, msg: &str) -> String {
        format!("{} line {}: {msg}", self.file.display(), index + 1)
    }

    /// The request of one line, or why there is none.
    fn request(
        &self,
        model: &PaliGemma,
        index: usize,
        line: &str,
    ) -> std::result::Result<Request, String> {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| self.located(index, &format!("not JSON: {e}")))?;
        let field = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .ok_or_else(|| self.located(index, &format!("needs a string \"{k}\"")))
        };
        let paths: Vec<String> = match v.get("image") {
            Some(serde_json::Value::Array(list)) if !list.is_empty() => list
                .iter()
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    self.located(index, "\"image\" must be a path or a list of paths")
                })?,
            Some(serde_json::Value::Array(_)) => {
                return Err(self.located(index, "\"image\" is an empty list"))
            }
            _ => vec![field("image")?],
        };
        let prompt = field("prompt")?;
        let mut images = paths
            .iter()
            .map(|path| {
                model
                    .images
                    .load(std::path::Path::new(path))
                    .map(ImageInput::Pixels)
                    .map_err(|e| self.located(index, &e.to_string()))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let image = match images.len() {
            1 => images.remove(0),
            _ => ImageInput::Many(images),
        };
        Ok(Request {
            image,
            prompt: Prompt::Text(prompt),
            options: self.options.clone(),
        })
    }

    fn print(&self, out: &mut impl Write, model: &PaliGemma, result: LineResult) -> Result<()> {
        match (result, self.json) {
            (Ok(mut g), true) => {
                g.timings.load_s = model.load_seconds();
                writeln!(out, "{}", serde_json::to_string(&g)?)?;
            }
            (Ok(g), false) => writeln!(out, "{}", g.text)?,
            (Err(e), true) => writeln!(out, "{}", serde_json::json!({ "error": e }))?,
            (Err(e), false) => {
                eprintln!("error: {e}");
                writeln!(out)?;
            }
        }
        out.flush()?;
        Ok(())
    }
}
