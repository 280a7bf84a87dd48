//! `paligemma serve` end to end: the binary on a free port, spoken to over plain HTTP/1.1.
#![cfg(feature = "serve")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// The CLI's greedy answer to "detect square" on scene 0 (tests/cli.rs, tests/embedding.rs).
const SQUARE: &str = "<loc0238><loc0178><loc0544><loc0544> square";

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start the server on the tiny model with `args`, and wait until /health says ready.
fn start(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_paligemma"))
        .args(["serve", "--port", "0", "--model"])
        .arg(common::shapes_model())
        .args(args)
        .env_remove("PALIGEMMA_API_KEY")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start paligemma serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let port = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(addr) = line.strip_prefix("listening on http://") {
            break addr.rsplit(':').next().unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    let server = Server { child, port };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, _, body) = http(server.port, "GET", "/health", &[], b"");
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
        assert!(Instant::now() < deadline, "the model never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// One request; returns the status, the lower-cased head and the body (de-chunked).
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A server may answer (413) before the whole body is sent.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let mut rest = raw[split + 4..].to_vec();
    let status = head[9..12].parse().unwrap();
    if head.contains("transfer-encoding: chunked") {
        rest = dechunk(&rest);
    }
    (status, head, rest)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 4 + size..];
    }
}

fn post(port: u16, path: &str, body: &Value, headers: &[&str]) -> (u16, String, Vec<u8>) {
    http(port, "POST", path, headers, body.to_string().as_bytes())
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

/// A request that must fail: its status and error message.
fn rejected(port: u16, path: &str, body: &Value) -> (u16, String) {
    let (status, _, b) = post(port, path, body, &[]);
    let message = json_of(&b)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    (status, message)
}

/// Scene 0's "detect square", with `headers`, answered as the CLI answers it.
fn assert_answers_square(port: u16, headers: &[&str]) {
    let body = chat(&scene_b64(0), "detect square", json!({}));
    let (status, _, b) = post(port, "/v1/chat/completions", &body, headers);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json_of(&b)["choices"][0]["message"]["content"], SQUARE);
}

fn scene_b64(i: usize) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(common::scene(i)).unwrap())
}

fn chat(image_b64: &str, prompt: &str, extra: Value) -> Value {
    let mut body = json!({"model": "tiny-shapes", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{image_b64}")}},
        {"type": "text", "text": prompt},
    ]}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[test]
fn openai_and_ollama_answer_as_the_cli() {
    let server = start(&[]);
    let port = server.port;
    let img = scene_b64(0);

    let (status, _, body) = post(
        port,
        "/v1/chat/completions",
        &chat(&img, "detect square", json!({})),
        &[],
    );
    assert_eq!(status, 200);
    let v = json_of(&body);
    assert_eq!(v["choices"][0]["message"]["content"], SQUARE);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 260, "completion_tokens": 6, "total_tokens": 266})
    );
    let objects = v["paligemma"]["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0]["label"], "square");
    // <loc0238><loc0178><loc0544><loc0544> on 224 px: y 52.06, x 38.94, 119, 119.
    assert_eq!(objects[0]["box"], json!([38.9375, 52.0625, 119.0, 119.0]));

    let (status, _, body) = post(
        port,
        "/v1/chat/completions",
        &chat(
            &img,
            "detect square",
            json!({"max_tokens": 3, "logprobs": true, "top_logprobs": 2}),
        ),
        &[],
    );
    assert_eq!(status, 200);
    let v = json_of(&body);
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "<loc0238><loc0178><loc0544>"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len(), 3);
    assert_eq!(lp[0]["token"], "<loc0238>");
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(lp[0]["top_logprobs"][0]["id"], 1262);
    assert_eq!(lp[0]["top_logprobs"][0]["token"], "<loc0238>");
    assert_eq!(lp[0]["top_logprobs"][0]["logprob"], lp[0]["logprob"]);

    let (status, head, body) = post(
        port,
        "/v1/chat/completions",
        &chat(&img, "detect square", json!({"stream": true})),
        &[],
    );
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let text = String::from_utf8(body).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| json_of(e.strip_prefix("data: ").unwrap().as_bytes()))
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, SQUARE);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["usage"]["completion_tokens"], 6);
    assert_eq!(last["paligemma"]["objects"][0]["label"], "square");

    let (status, head, body) = post(
        port,
        "/api/generate",
        &json!({"model": "tiny-shapes", "prompt": "detect square", "images": [img]}),
        &[],
    );
    assert_eq!(status, 200);
    assert!(head.contains("application/x-ndjson"), "{head}");
    let lines: Vec<Value> = String::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| json_of(l.as_bytes()))
        .collect();
    let streamed: String = lines
        .iter()
        .filter_map(|l| l["response"].as_str())
        .collect();
    assert_eq!(streamed, SQUARE);
    let fin = lines.last().unwrap();
    assert_eq!(fin["done"], true);
    assert_eq!(fin["done_reason"], "stop");
    assert_eq!(fin["eval_count"], 6);
    assert_eq!(fin["prompt_eval_count"], 260);
    assert!(fin["total_duration"].as_u64().unwrap() > 0);
    assert!(lines[..lines.len() - 1].iter().all(|l| l["done"] == false));

    let (status, _, body) = post(
        port,
        "/api/generate",
        &json!({"prompt": "detect square",
        "images": [scene_b64(0)], "stream": false, "options": {"num_predict": 2}}),
        &[],
    );
    assert_eq!(status, 200);
    let v = json_of(&body);
    assert_eq!(
        (v["response"].as_str(), v["done_reason"].as_str()),
        (Some("<loc0238><loc0178>"), Some("length"))
    );

    let (_, _, body) = http(port, "GET", "/v1/models", &[], b"");
    assert_eq!(json_of(&body)["data"][0]["id"], "tiny-shapes");
    let (_, _, body) = http(port, "GET", "/api/tags", &[], b"");
    assert_eq!(json_of(&body)["models"][0]["name"], "tiny-shapes");
    let (status, _, body) = http(port, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    let metrics = String::from_utf8(body).unwrap();
    assert!(
        metrics.contains("paligemma_requests_total 5\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("paligemma_tokens_generated_total 23\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("paligemma_time_to_first_token_seconds_count 5\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("paligemma_live_sequences 0\n"),
        "{metrics}"
    );
}

#[test]
fn sixty_four_concurrent_requests_answer_as_they_do_alone() {
    let server = start(&["--max-batch", "16"]);
    let port = server.port;
    let prompts = [
        "detect square",
        "caption en",
        "detect circle ; triangle",
        "how many shapes",
    ];
    let request = |k: usize| chat(&scene_b64(k % 6), prompts[k % 4], json!({}));
    let answer = |k: usize| -> Value {
        let (status, _, body) = post(port, "/v1/chat/completions", &request(k), &[]);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v = json_of(&body);
        json!([v["choices"], v["usage"]])
    };
    // The 24 distinct requests, one at a time.
    let alone: Vec<Value> = (0..24).map(answer).collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64).map(|k| s.spawn(move || answer(k))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (k, t) in together.iter().enumerate() {
        assert_eq!(t, &alone[k % 24], "request {k}");
    }
    let (_, _, body) = http(port, "GET", "/metrics", &[], b"");
    let metrics = String::from_utf8(body).unwrap();
    assert!(
        metrics.contains("paligemma_requests_total 88\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("paligemma_requests_rejected_total 0\n"),
        "{metrics}"
    );
}

#[test]
fn sigterm_lets_the_request_in_flight_finish() {
    let mut server = start(&[]);
    let port = server.port;
    let pid = server.child.id().to_string();
    let answer = std::thread::scope(|s| {
        let req = s.spawn(|| {
            post(
                port,
                "/api/generate",
                &json!({"prompt": "detect square",
            "images": [scene_b64(0)], "stream": false}),
                &[],
            )
        });
        std::thread::sleep(Duration::from_millis(20));
        // The shell's builtin `kill`: no procps needed.
        let kill = Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status()
            .unwrap();
        assert!(kill.success());
        req.join().unwrap()
    });
    assert_eq!(answer.0, 200);
    assert_eq!(json_of(&answer.2)["response"], SQUARE);
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn bad_requests_get_clear_errors() {
    let server = start(&["--max-body", "100000"]);
    let port = server.port;
    let (s, _, b) = http(port, "POST", "/v1/chat/completions", &[], b"{not json");
    let m = json_of(&b)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(s, 400);
    assert!(m.contains("not JSON"), "{m}");

    let no_image = json!({"messages": [{"role": "user", "content": "caption en"}]});
    let (s, m) = rejected(port, "/v1/chat/completions", &no_image);
    assert_eq!(s, 400);
    assert!(m.contains("image_url"), "{m}");

    let mut remote = chat("x", "caption en", json!({}));
    remote["messages"][0]["content"][0]["image_url"]["url"] = json!("https://example.com/cat.png");
    let (s, m) = rejected(port, "/v1/chat/completions", &remote);
    assert_eq!(s, 400);
    assert!(m.contains("does not fetch"), "{m}");

    let not_image = base64::engine::general_purpose::STANDARD.encode(b"hello, not a picture");
    let (s, m) = rejected(
        port,
        "/v1/chat/completions",
        &chat(&not_image, "caption en", json!({})),
    );
    assert_eq!(s, 400);
    assert!(m.contains("not a recognised image format"), "{m}");

    let (s, m) = rejected(
        port,
        "/v1/chat/completions",
        &chat(&scene_b64(0), "caption en", json!({"max_tokens": "many"})),
    );
    assert_eq!(s, 400);
    assert!(m.contains("max_tokens"), "{m}");

    let extra = json!({"logprobs": true, "top_logprobs": 21});
    let (s, m) = rejected(
        port,
        "/v1/chat/completions",
        &chat(&scene_b64(0), "caption en", extra),
    );
    assert_eq!(s, 400);
    assert!(m.contains("top_logprobs"), "{m}");

    let (s, m) = rejected(
        port,
        "/api/generate",
        &json!({"prompt": "caption en", "images": []}),
    );
    assert_eq!(s, 400);
    assert!(m.contains("exactly one image"), "{m}");
    let two = json!({"prompt": "caption en", "images": [scene_b64(0), scene_b64(1)]});
    let (s, m) = rejected(port, "/api/generate", &two);
    assert_eq!(s, 400);
    assert!(m.contains("got 2") && m.contains("--image repeated"), "{m}");

    let big = chat(&"A".repeat(200_000), "caption en", json!({}));
    let (s, _, b) = post(port, "/v1/chat/completions", &big, &[]);
    assert_eq!(s, 413);
    assert_eq!(json_of(&b)["error"]["code"], "payload_too_large");

    let (s, _, b) = http(port, "GET", "/v2/nothing", &[], b"");
    assert_eq!(s, 404);
    assert_eq!(json_of(&b)["error"]["code"], "not_found");

    // A prompt longer than the model's context (8192 positions).
    let long = "caption en ".repeat(5000);
    let (s, m) = rejected(
        port,
        "/v1/chat/completions",
        &chat(&scene_b64(0), &long, json!({})),
    );
    assert_eq!(s, 400, "{m}");

    // The server still answers after all of that.
    assert_answers_square(port, &[]);
}

#[test]
fn api_key_guards_every_endpoint_but_health() {
    let server = start(&["--api-key", "s3cret"]);
    let port = server.port;
    assert_eq!(http(port, "GET", "/health", &[], b"").0, 200);
    assert_eq!(http(port, "GET", "/v1/models", &[], b"").0, 401);
    assert_eq!(
        http(
            port,
            "GET",
            "/metrics",
            &["Authorization: Bearer s3creT"],
            b""
        )
        .0,
        401
    );
    let body = chat(&scene_b64(0), "detect square", json!({}));
    assert_eq!(post(port, "/v1/chat/completions", &body, &[]).0, 401);
    assert_answers_square(port, &["Authorization: Bearer s3cret"]);
    assert_eq!(
        http(
            port,
            "GET",
            "/v1/models",
            &["Authorization: Bearer s3cret"],
            b""
        )
        .0,
        200
    );
}

#[test]
fn a_full_server_answers_503_with_retry_after() {
    let server = start(&["--max-batch", "1", "--max-queue", "0"]);
    let port = server.port;
    let body = chat(&scene_b64(1), "caption en", json!({}));
    let results: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let r = post(port, "/v1/chat/completions", &body, &[]);
                    (r.0, r.1)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().any(|r| r.0 == 200), "{results:?}");
    let busy: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert!(!busy.is_empty(), "{results:?}");
    assert!(
        busy.iter().all(|r| r.1.contains("retry-after: 1")),
        "{busy:?}"
    );
    assert!(
        results.iter().all(|r| r.0 == 200 || r.0 == 503),
        "{results:?}"
    );
}

#[test]
fn a_client_that_leaves_cancels_its_request() {
    let server = start(&["--max-batch", "1"]);
    let port = server.port;
    let metric = |name: &str| -> u64 {
        let (_, _, body) = http(port, "GET", "/metrics", &[], b"");
        let text = String::from_utf8(body).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap()
            .to_string();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    // While one request holds the only slot, a second one is queued and its client leaves
    // as soon as the response head arrives.
    let body = chat(&scene_b64(2), "caption en", json!({"stream": true})).to_string();
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            post(
                port,
                "/v1/chat/completions",
                &chat(&scene_b64(1), "caption en", json!({})),
                &[],
            )
        });
        std::thread::sleep(Duration::from_millis(5));
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        c.write_all(req.as_bytes()).unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        assert_eq!(&head[9..12], b"200");
        drop(c);
        assert_eq!(first.join().unwrap().0, 200);
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    // Cancelled, and its slot free again (the gauges follow the step that reported it).
    while metric("paligemma_requests_cancelled_total") == 0
        || metric("paligemma_live_sequences") != 0
        || metric("paligemma_queue_depth") != 0
    {
        assert!(
            Instant::now() < deadline,
            "the request that lost its client was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric("paligemma_requests_cancelled_total"), 1);
    assert_answers_square(port, &[]);
}

#[test]
fn a_request_past_the_timeout_gets_504() {
    let server = start(&["--timeout", "0"]);
    let port = server.port;
    let (s, _, b) = post(
        port,
        "/v1/chat/completions",
        &chat(&scene_b64(0), "caption en", json!({})),
        &[],
    );
    assert_eq!(s, 504);
    assert_eq!(json_of(&b)["error"]["code"], "timeout");
    // Streams are not cut by the timeout.
    let (s, _, b) = post(
        port,
        "/api/generate",
        &json!({"prompt": "detect square", "images": [scene_b64(0)]}),
        &[],
    );
    assert_eq!(s, 200);
    let text = String::from_utf8(b).unwrap();
    assert!(
        text.lines().last().unwrap().contains("\"done\":true"),
        "{text}"
    );
}
