//! A stand-in for Amazon Bedrock Runtime's Converse and ConverseStream APIs, so tests can
//! drive the real `aws-sdk-bedrockruntime` client (through its endpoint-url setting)
//! against scripted model replies, on 127.0.0.1 and without an AWS account.
//!
//! A test queues [`Reply`]s with [`StandIn::push`]; every model request, streaming or
//! not, takes the next one in order, and every request received is recorded
//! ([`StandIn::requests`]) so the test can check what the client sent: messages, system
//! prompt, tool config, cache points, inference config, tool results.
//!
//! What the wire carries is what the real service sends, as far as the SDK can tell:
//! - `POST /model/{modelId}/converse` answers JSON; `POST /model/{modelId}/converse-stream`
//!   answers `application/vnd.amazon.eventstream` frames (encoded by
//!   `aws-smithy-eventstream`, the codec the SDK decodes with), sent in HTTP/1.1 chunks
//!   and flushed one by one so a client sees their order and timing.
//! - A stream is `messageStart`, then per content block: text blocks go straight to
//!   `contentBlockDelta`s (the service sends no `contentBlockStart` for text), tool use
//!   blocks open with a `contentBlockStart` naming the tool and its id and carry their
//!   input JSON as a string split over `contentBlockDelta`s; each block ends with a
//!   `contentBlockStop`, then `messageStop` and `metadata` (usage and latency).
//! - Errors carry the status and `x-amzn-errortype` header the service uses and a JSON
//!   `{"message": ...}` body; a request without a SigV4 `authorization` header is refused
//!   with 403 `MissingAuthenticationTokenException` before anything else is looked at.
//!   The signature itself is not verified.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use serde_json::{Value, json};

/// Characters of reply text per `contentBlockDelta`: small, so a streamed text always
/// arrives in several pieces, as a model's tokens do.
const TEXT_DELTA_CHARS: usize = 4;

/// Characters of tool input JSON per `contentBlockDelta`, so the client has to
/// reassemble the input from several pieces.
const INPUT_DELTA_CHARS: usize = 8;

/// The start of the `authorization` header of a SigV4-signed request.
const SIGV4_PREFIX: &str = "AWS4-HMAC-SHA256 Credential=";

/// The message of the 500 answered when a test did not script enough replies.
pub const NO_REPLY_LEFT: &str = "stand-in: no scripted reply left for this request";

/// A local Bedrock Runtime endpoint serving scripted replies. Its server stops when it
/// is dropped; a request still waiting out a reply's delay then gets a 503
/// ServiceUnavailableException at once.
pub struct StandIn {
    shared: Arc<Shared>,
    server: Arc<tiny_http::Server>,
    port: u16,
    acceptor: Option<JoinHandle<()>>,
}

/// One request the stand-in received, in the order received.
#[derive(Clone, Debug)]
pub struct Received {
    /// The request path as sent, e.g. `/model/us.anthropic...v1%3A0/converse-stream`.
    pub path: String,
    /// The model id from the path, percent-decoded; empty if the path names no model.
    pub model: String,
    /// Whether this was a ConverseStream request.
    pub streaming: bool,
    /// The `authorization` header, if any.
    pub authorization: Option<String>,
    /// The request body parsed as JSON; a body that is not JSON is kept as a string.
    pub body: Value,
}

/// Token counts reported for one reply, in the stream's `metadata` event and in
/// Converse's `usage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub input: u32,
    pub output: u32,
    pub cache_read: u32,
    pub cache_write: u32,
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            input: 120,
            output: 30,
            cache_read: 0,
            cache_write: 0,
        }
    }
}

impl Usage {
    /// `totalTokens` as Bedrock counts it: input, output, and the cached input read
    /// and written, which `inputTokens` does not include.
    pub fn total(&self) -> u32 {
        self.input + self.output + self.cache_read + self.cache_write
    }

    fn to_json(self) -> Value {
        json!({
            "inputTokens": self.input,
            "outputTokens": self.output,
            "totalTokens": self.total(),
            "cacheReadInputTokens": self.cache_read,
            "cacheWriteInputTokens": self.cache_write,
        })
    }
}

/// One tool call in a scripted reply. Its `toolUseId` is given out when the reply is
/// sent: `tooluse_1`, `tooluse_2`, ... in the order the stand-in sends them.
#[derive(Clone, Debug)]
pub struct ToolCall {
    name: String,
    input: ToolInput,
}

#[derive(Clone, Debug)]
enum ToolInput {
    Json(Value),
    /// Sent verbatim, so a test can make the model produce malformed input.
    Raw(String),
}

impl ToolCall {
    /// A call of tool `name` with `input` as its arguments.
    pub fn new(name: &str, input: Value) -> Self {
        Self {
            name: name.to_owned(),
            input: ToolInput::Json(input),
        }
    }

    /// A call whose input is the text `raw_input`, which need not be valid JSON. The
    /// stream carries it verbatim; Converse, whose input is a JSON document, carries it
    /// parsed if it is JSON and as a JSON string otherwise.
    pub fn raw(name: &str, raw_input: &str) -> Self {
        Self {
            name: name.to_owned(),
            input: ToolInput::Raw(raw_input.to_owned()),
        }
    }

    fn input_text(&self) -> String {
        match &self.input {
            ToolInput::Json(value) => value.to_string(),
            ToolInput::Raw(raw) => raw.clone(),
        }
    }

    fn input_document(&self) -> Value {
        match &self.input {
            ToolInput::Json(value) => value.clone(),
            ToolInput::Raw(raw) => {
                serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.clone()))
            }
        }
    }
}

/// The exceptions Bedrock Runtime answers with, each with the HTTP status the service
/// uses for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exception {
    AccessDenied,
    ResourceNotFound,
    Throttling,
    Validation,
    ModelNotReady,
    ServiceUnavailable,
    InternalServer,
    ModelTimeout,
    ModelError,
    ServiceQuotaExceeded,
    /// Only in a stream (or as ConverseStream's HTTP error): the model failed mid-reply.
    ModelStreamError,
}

impl Exception {
    /// The name in `x-amzn-errortype`, e.g. `ThrottlingException`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AccessDenied => "AccessDeniedException",
            Self::ResourceNotFound => "ResourceNotFoundException",
            Self::Throttling => "ThrottlingException",
            Self::Validation => "ValidationException",
            Self::ModelNotReady => "ModelNotReadyException",
            Self::ServiceUnavailable => "ServiceUnavailableException",
            Self::InternalServer => "InternalServerException",
            Self::ModelTimeout => "ModelTimeoutException",
            Self::ModelError => "ModelErrorException",
            Self::ServiceQuotaExceeded => "ServiceQuotaExceededException",
            Self::ModelStreamError => "ModelStreamErrorException",
        }
    }

    /// The HTTP status the service answers this exception with.
    pub fn status(self) -> u16 {
        match self {
            Self::AccessDenied => 403,
            Self::ResourceNotFound => 404,
            Self::Throttling | Self::ModelNotReady => 429,
            Self::Validation | Self::ServiceQuotaExceeded => 400,
            Self::ServiceUnavailable => 503,
            Self::InternalServer => 500,
            Self::ModelTimeout => 408,
            Self::ModelError | Self::ModelStreamError => 424,
        }
    }

    /// The `:exception-type` of an exception frame in a stream: the name with a lower
    /// case first letter, e.g. `throttlingException`.
    fn stream_name(self) -> String {
        let name = self.name();
        let mut chars = name.chars();
        match chars.next() {
            Some(first) => first.to_lowercase().chain(chars).collect(),
            None => String::new(),
        }
    }
}

/// A scripted answer to one model request, with its usage numbers and an optional
/// delay before the stand-in starts answering.
#[derive(Clone, Debug)]
pub struct Reply {
    answer: Answer,
    usage: Usage,
    delay: Duration,
    /// How long a streamed answer waits after its text, before its end.
    hold: Duration,
    /// Whether a streamed answer ends with its `metadata` event (usage and latency).
    metadata: bool,
}

#[derive(Clone, Debug)]
enum Answer {
    Message {
        text: String,
        tools: Vec<ToolCall>,
        stop_reason: Option<String>,
    },
    Error {
        exception: Exception,
        message: String,
    },
    /// Some text, then an exception frame instead of the end of the message.
    BrokenStream {
        text: String,
        exception: Exception,
        message: String,
    },
}

impl Reply {
    fn from_answer(answer: Answer) -> Self {
        Self {
            answer,
            usage: Usage::default(),
            delay: Duration::ZERO,
            hold: Duration::ZERO,
            metadata: true,
        }
    }

    /// A final answer: `text`, stop reason `end_turn`.
    pub fn text(text: &str) -> Self {
        Self::from_answer(Answer::Message {
            text: text.to_owned(),
            tools: Vec::new(),
            stop_reason: None,
        })
    }

    /// One call of tool `name` with `input`, stop reason `tool_use`.
    pub fn tool(name: &str, input: Value) -> Self {
        Self::tools(vec![ToolCall::new(name, input)])
    }

    /// Several tool calls in one message, in this order, stop reason `tool_use`.
    pub fn tools(calls: Vec<ToolCall>) -> Self {
        Self::from_answer(Answer::Message {
            text: String::new(),
            tools: calls,
            stop_reason: None,
        })
    }

    /// A tool call whose input is the text `raw_input`, valid JSON or not (see
    /// [`ToolCall::raw`]).
    pub fn raw_tool(name: &str, raw_input: &str) -> Self {
        Self::tools(vec![ToolCall::raw(name, raw_input)])
    }

    /// An error answer: the exception's status, `x-amzn-errortype` and `message`.
    pub fn error(exception: Exception, message: &str) -> Self {
        Self::from_answer(Answer::Error {
            exception,
            message: message.to_owned(),
        })
    }

    /// 403 AccessDeniedException, as for a model the account has not enabled.
    pub fn access_denied() -> Self {
        Self::error(
            Exception::AccessDenied,
            "You don't have access to the model with the specified model ID.",
        )
    }

    /// 429 ThrottlingException, as when the account's request rate is exceeded.
    pub fn throttled() -> Self {
        Self::error(
            Exception::Throttling,
            "Too many requests, please wait before trying again.",
        )
    }

    /// 400 ValidationException for a conversation longer than the model's context.
    pub fn too_long() -> Self {
        Self::error(
            Exception::Validation,
            "Input is too long for requested model.",
        )
    }

    /// 429 ModelNotReadyException, as while a model is being loaded.
    pub fn not_ready() -> Self {
        Self::error(
            Exception::ModelNotReady,
            "Model is not ready to serve inference requests. Try again later.",
        )
    }

    /// A stream that sends `text` and then breaks off with an exception frame
    /// (`:message-type` exception, `:exception-type` e.g. `throttlingException`). A
    /// Converse (non-streaming) request gets the exception as its HTTP error instead.
    pub fn mid_stream_exception(text: &str, exception: Exception, message: &str) -> Self {
        Self::from_answer(Answer::BrokenStream {
            text: text.to_owned(),
            exception,
            message: message.to_owned(),
        })
    }

    /// Text the model writes before its tool calls (the first content block). No effect
    /// on an error reply.
    pub fn with_leading_text(mut self, leading: &str) -> Self {
        if let Answer::Message { text, .. } = &mut self.answer {
            *text = leading.to_owned();
        }
        self
    }

    /// Another stop reason than the one the content implies, e.g. `max_tokens`. No
    /// effect on an error reply.
    pub fn with_stop_reason(mut self, reason: &str) -> Self {
        if let Answer::Message { stop_reason, .. } = &mut self.answer {
            *stop_reason = Some(reason.to_owned());
        }
        self
    }

    /// The token counts to report (default: input 120, output 30, no cache use).
    pub fn with_usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }

    /// Wait `delay` before answering, keeping the connection open, e.g. to let a test
    /// cancel the request. A client that goes away meanwhile is no error.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Stream the text, then wait `hold` before the frames that end the message (and
    /// carry its usage), e.g. to let a test cancel while the answer is shown but not
    /// over. A client that goes away meanwhile is no error.
    pub fn holding_after_text(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    /// A streamed answer that ends after `messageStop`, without the `metadata` event
    /// that carries its usage (Bedrock always sends it; a broken proxy might not).
    pub fn without_metadata(mut self) -> Self {
        self.metadata = false;
        self
    }
}

impl StandIn {
    /// Start serving on a free port of 127.0.0.1.
    pub fn start() -> Result<Self> {
        let server = tiny_http::Server::http("127.0.0.1:0")
            .map_err(|err| anyhow!("cannot listen on 127.0.0.1 for the Bedrock stand-in: {err}"))?;
        let port = server
            .server_addr()
            .to_ip()
            .context("the Bedrock stand-in listens on no IP address")?
            .port();
        let server = Arc::new(server);
        let shared = Arc::new(Shared::default());
        let acceptor = std::thread::Builder::new()
            .name("bedrock-stand-in".into())
            .spawn({
                let server = Arc::clone(&server);
                let shared = Arc::clone(&shared);
                move || accept(&server, &shared)
            })
            .context("cannot start the Bedrock stand-in's server thread")?;
        Ok(Self {
            shared,
            server,
            port,
            acceptor: Some(acceptor),
        })
    }

    /// The endpoint URL to give the client, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Queue `reply` as the answer to the next model request not yet answered.
    pub fn push(&self, reply: Reply) {
        self.shared.state().replies.push_back(reply);
    }

    /// Every request received so far, in order, including refused ones.
    pub fn requests(&self) -> Vec<Received> {
        self.shared.state().received.clone()
    }

    /// How many queued replies no request has taken yet.
    pub fn remaining(&self) -> usize {
        self.shared.state().replies.len()
    }

    /// Wait `delay` between the frames of every stream from now on (default none).
    pub fn set_frame_delay(&self, delay: Duration) {
        self.shared.state().frame_delay = delay;
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.shared.state().stopped = true;
        self.shared.wake.notify_all();
        self.server.unblock();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// What the server thread and the request threads share with the [`StandIn`].
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes replies waiting out a delay when the stand-in stops.
    wake: Condvar,
}

#[derive(Default)]
struct State {
    replies: VecDeque<Reply>,
    received: Vec<Received>,
    frame_delay: Duration,
    tool_calls_sent: u64,
    requests_seen: u64,
    stopped: bool,
}

impl Shared {
    /// The state, even if a request thread panicked while holding it: the stand-in
    /// must keep answering so the test reports its own failure.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleep for `delay`; false if the stand-in stopped meanwhile.
    fn pause(&self, delay: Duration) -> bool {
        let state = self.state();
        if delay.is_zero() {
            return !state.stopped;
        }
        let (state, _) = self
            .wake
            .wait_timeout_while(state, delay, |state| !state.stopped)
            .unwrap_or_else(PoisonError::into_inner);
        !state.stopped
    }

    fn next_tool_use_id(&self) -> String {
        let mut state = self.state();
        state.tool_calls_sent += 1;
        format!("tooluse_{}", state.tool_calls_sent)
    }

    fn next_request_id(&self) -> String {
        let mut state = self.state();
        state.requests_seen += 1;
        format!("00000000-0000-4000-8000-{:012}", state.requests_seen)
    }
}

/// The server thread: one thread per request, so a delayed reply holds up no other.
fn accept(server: &tiny_http::Server, shared: &Arc<Shared>) {
    loop {
        match server.recv() {
            Ok(request) => {
                let shared = Arc::clone(shared);
                let spawned = std::thread::Builder::new()
                    .name("bedrock-stand-in-request".into())
                    .spawn(move || {
                        let line = format!("{} {}", request.method(), request.url());
                        if let Err(err) = answer(&shared, request) {
                            eprintln!("bedrock stand-in: answering {line}: {err:#}");
                        }
                    });
                if let Err(err) = spawned {
                    eprintln!("bedrock stand-in: cannot start a request thread: {err}");
                }
            }
            Err(_) if shared.state().stopped => return,
            Err(err) => eprintln!("bedrock stand-in: accepting a request: {err}"),
        }
    }
}

/// The operation a request path names.
struct Route {
    model: String,
    streaming: bool,
}

impl Route {
    /// `/model/{modelId}/converse` or `/model/{modelId}/converse-stream`.
    fn parse(path: &str) -> Option<Self> {
        let path = path.split_once('?').map_or(path, |(path, _query)| path);
        let (model, operation) = path.strip_prefix("/model/")?.rsplit_once('/')?;
        let streaming = match operation {
            "converse" => false,
            "converse-stream" => true,
            _ => return None,
        };
        Some(Self {
            model: percent_decode(model),
            streaming,
        })
    }
}

fn answer(shared: &Shared, mut request: tiny_http::Request) -> Result<()> {
    let started = Instant::now();
    let path = request.url().to_owned();
    let authorization = header_value(&request, "authorization");
    let signed = authorization
        .as_deref()
        .is_some_and(|value| value.starts_with(SIGV4_PREFIX))
        && header_value(&request, "x-amz-date").is_some();
    let mut raw_body = Vec::new();
    request
        .as_reader()
        .read_to_end(&mut raw_body)
        .context("reading the request body")?;
    let body = serde_json::from_slice(&raw_body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw_body).into_owned()));
    let route = (*request.method() == tiny_http::Method::Post)
        .then(|| Route::parse(&path))
        .flatten();
    shared.state().received.push(Received {
        path: path.clone(),
        model: route.as_ref().map(|r| r.model.clone()).unwrap_or_default(),
        streaming: route.as_ref().is_some_and(|r| r.streaming),
        authorization,
        body: body.clone(),
    });

    let request_id = shared.next_request_id();
    if !signed {
        return respond_error(
            request,
            &request_id,
            403,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        );
    }
    let Some(route) = route else {
        return respond_error(
            request,
            &request_id,
            404,
            "UnknownOperationException",
            &format!("stand-in: no Bedrock Runtime operation at {path}"),
        );
    };
    if !body.is_object() {
        return respond_error(
            request,
            &request_id,
            400,
            "SerializationException",
            "stand-in: the request body is not a JSON object",
        );
    }
    let Some(reply) = shared.state().replies.pop_front() else {
        return respond_exception(
            request,
            &request_id,
            Exception::InternalServer,
            NO_REPLY_LEFT,
        );
    };
    if !shared.pause(reply.delay) {
        return respond_exception(
            request,
            &request_id,
            Exception::ServiceUnavailable,
            "stand-in: stopped before this delayed reply was due",
        );
    }
    match &reply.answer {
        Answer::Error { exception, message } => {
            respond_exception(request, &request_id, *exception, message)
        }
        Answer::BrokenStream {
            exception, message, ..
        } if !route.streaming => respond_exception(request, &request_id, *exception, message),
        Answer::BrokenStream {
            text,
            exception,
            message,
        } => {
            let mut stream = EventStream::open(shared, request, &request_id)?;
            stream.event("messageStart", json!({ "role": "assistant" }))?;
            stream.text_deltas(0, text)?;
            stream.exception(*exception, message)?;
            stream.finish()
        }
        Answer::Message {
            text,
            tools,
            stop_reason,
        } => {
            let message = Turn {
                text,
                tools: tools
                    .iter()
                    .map(|call| (shared.next_tool_use_id(), call))
                    .collect(),
                stop_reason: stop_reason_of(stop_reason, tools),
                usage: reply.usage,
                hold: reply.hold,
                metadata: reply.metadata,
                started,
            };
            if route.streaming {
                stream_message(EventStream::open(shared, request, &request_id)?, &message)
            } else {
                respond_json(request, &request_id, 200, None, &message.converse_body())
            }
        }
    }
}

/// A model message ready to send: its tool calls have their ids.
struct Turn<'a> {
    text: &'a str,
    tools: Vec<(String, &'a ToolCall)>,
    stop_reason: String,
    usage: Usage,
    hold: Duration,
    metadata: bool,
    started: Instant,
}

impl Turn<'_> {
    /// Converse's JSON answer.
    fn converse_body(&self) -> Value {
        let mut content = Vec::new();
        if !self.text.is_empty() {
            content.push(json!({ "text": self.text }));
        }
        for (id, call) in &self.tools {
            content.push(json!({
                "toolUse": { "toolUseId": id, "name": call.name, "input": call.input_document() }
            }));
        }
        json!({
            "output": { "message": { "role": "assistant", "content": content } },
            "stopReason": self.stop_reason,
            "usage": self.usage.to_json(),
            "metrics": { "latencyMs": latency_ms(self.started) },
        })
    }
}

/// ConverseStream's frames for `turn`, in the order the service sends them.
fn stream_message(mut stream: EventStream<'_>, turn: &Turn<'_>) -> Result<()> {
    stream.event("messageStart", json!({ "role": "assistant" }))?;
    let mut index = 0;
    if !turn.text.is_empty() {
        stream.text_deltas(index, turn.text)?;
        if !stream.shared.pause(turn.hold) {
            return stream.finish();
        }
        stream.event("contentBlockStop", json!({ "contentBlockIndex": index }))?;
        index += 1;
    }
    for (id, call) in &turn.tools {
        stream.tool_use_block(index, id, call)?;
        index += 1;
    }
    stream.event("messageStop", json!({ "stopReason": turn.stop_reason }))?;
    if turn.metadata {
        stream.event(
            "metadata",
            json!({
                "usage": turn.usage.to_json(),
                "metrics": { "latencyMs": latency_ms(turn.started) },
            }),
        )?;
    }
    stream.finish()
}

fn stop_reason_of(scripted: &Option<String>, tools: &[ToolCall]) -> String {
    match scripted {
        Some(reason) => reason.clone(),
        None if tools.is_empty() => "end_turn".to_owned(),
        None => "tool_use".to_owned(),
    }
}

fn latency_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A ConverseStream answer being written: HTTP/1.1 chunks, one per event-stream frame,
/// each flushed as soon as it is written. (tiny_http's own chunked writer gathers 8 KiB
/// before it sends anything, which would hide the order and timing of frames.)
struct EventStream<'a> {
    shared: &'a Shared,
    out: Box<dyn Write + Send>,
    frames_sent: usize,
}

impl<'a> EventStream<'a> {
    fn open(shared: &'a Shared, request: tiny_http::Request, request_id: &str) -> Result<Self> {
        let mut out = request.into_writer();
        write!(
            out,
            "HTTP/1.1 200 OK\r\n\
             content-type: application/vnd.amazon.eventstream\r\n\
             transfer-encoding: chunked\r\n\
             x-amzn-requestid: {request_id}\r\n\
             \r\n"
        )
        .and_then(|()| out.flush())
        .context("writing the stream's response head (did the client go away?)")?;
        Ok(Self {
            shared,
            out,
            frames_sent: 0,
        })
    }

    /// An event frame: `:event-type`, `:content-type` application/json,
    /// `:message-type` event, and `payload` as JSON.
    fn event(&mut self, event_type: &'static str, payload: Value) -> Result<()> {
        let message = Message::new(payload.to_string().into_bytes())
            .add_header(string_header(":event-type", event_type))
            .add_header(string_header(":content-type", "application/json"))
            .add_header(string_header(":message-type", "event"));
        self.frame(&message)
            .with_context(|| format!("sending the {event_type} event"))
    }

    /// An exception frame, after which the service sends nothing more.
    fn exception(&mut self, exception: Exception, message: &str) -> Result<()> {
        let frame = Message::new(json!({ "message": message }).to_string().into_bytes())
            .add_header(string_header(":exception-type", exception.stream_name()))
            .add_header(string_header(":content-type", "application/json"))
            .add_header(string_header(":message-type", "exception"));
        self.frame(&frame)
            .with_context(|| format!("sending the {} frame", exception.name()))
    }

    /// The deltas of a text content block (the service sends no start for text).
    fn text_deltas(&mut self, index: usize, text: &str) -> Result<()> {
        for piece in pieces(text, TEXT_DELTA_CHARS) {
            self.event(
                "contentBlockDelta",
                json!({ "contentBlockIndex": index, "delta": { "text": piece } }),
            )?;
        }
        Ok(())
    }

    /// A tool use content block: a start naming the tool, its input JSON as a string
    /// split over deltas, and a stop.
    fn tool_use_block(&mut self, index: usize, id: &str, call: &ToolCall) -> Result<()> {
        self.event(
            "contentBlockStart",
            json!({
                "contentBlockIndex": index,
                "start": { "toolUse": { "toolUseId": id, "name": call.name } },
            }),
        )?;
        for piece in pieces(&call.input_text(), INPUT_DELTA_CHARS) {
            self.event(
                "contentBlockDelta",
                json!({ "contentBlockIndex": index, "delta": { "toolUse": { "input": piece } } }),
            )?;
        }
        self.event("contentBlockStop", json!({ "contentBlockIndex": index }))
    }

    fn frame(&mut self, message: &Message) -> Result<()> {
        let delay = self.shared.state().frame_delay;
        if self.frames_sent > 0 && !self.shared.pause(delay) {
            anyhow::bail!("the stand-in stopped in the middle of a stream");
        }
        let mut frame = Vec::new();
        aws_smithy_eventstream::frame::write_message_to(message, &mut frame)
            .context("encoding an event-stream frame")?;
        write!(self.out, "{:x}\r\n", frame.len())
            .and_then(|()| self.out.write_all(&frame))
            .and_then(|()| self.out.write_all(b"\r\n"))
            .and_then(|()| self.out.flush())
            .context("writing a frame (did the client go away?)")?;
        self.frames_sent += 1;
        Ok(())
    }

    /// The last chunk, which tells the client the stream ended on purpose.
    fn finish(mut self) -> Result<()> {
        self.out
            .write_all(b"0\r\n\r\n")
            .and_then(|()| self.out.flush())
            .context("ending the stream (did the client go away?)")
    }
}

fn string_header(name: &'static str, value: impl Into<String>) -> Header {
    Header::new(name, HeaderValue::String(value.into().into()))
}

fn respond_exception(
    request: tiny_http::Request,
    request_id: &str,
    exception: Exception,
    message: &str,
) -> Result<()> {
    respond_error(
        request,
        request_id,
        exception.status(),
        exception.name(),
        message,
    )
}

fn respond_error(
    request: tiny_http::Request,
    request_id: &str,
    status: u16,
    error_type: &str,
    message: &str,
) -> Result<()> {
    respond_json(
        request,
        request_id,
        status,
        Some(error_type),
        &json!({ "message": message }),
    )
}

fn respond_json(
    request: tiny_http::Request,
    request_id: &str,
    status: u16,
    error_type: Option<&str>,
    body: &Value,
) -> Result<()> {
    let mut response = tiny_http::Response::from_data(body.to_string().into_bytes())
        .with_status_code(status)
        .with_header(http_header("content-type", "application/json")?)
        .with_header(http_header("x-amzn-requestid", request_id)?);
    if let Some(error_type) = error_type {
        response.add_header(http_header("x-amzn-errortype", error_type)?);
    }
    request
        .respond(response)
        .with_context(|| format!("sending the {status} answer (did the client go away?)"))
}

fn http_header(name: &str, value: &str) -> Result<tiny_http::Header> {
    tiny_http::Header::from_bytes(name, value)
        .map_err(|()| anyhow!("HTTP header {name}: {value:?} is not ASCII"))
}

fn header_value(request: &tiny_http::Request, name: &'static str) -> Option<String> {
    request
        .headers()
        .iter()
        .find(|header| header.field.equiv(name))
        .map(|header| header.value.as_str().to_owned())
}

/// Decode `%XX` escapes, as in a model id like `...-v1%3A0`.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// `text` cut into pieces of at most `size` characters (never inside a character).
fn pieces(text: &str, size: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (count, (at, _)) in text.char_indices().enumerate() {
        if count > 0 && count % size == 0 {
            pieces.push(&text[start..at]);
            start = at;
        }
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_percent_decoded_from_the_path() {
        let route = Route::parse("/model/us.anthropic.claude-haiku-4-5-20251001-v1%3A0/converse")
            .expect("a converse path");
        assert_eq!(route.model, "us.anthropic.claude-haiku-4-5-20251001-v1:0");
        assert!(!route.streaming);
        let route = Route::parse("/model/m%2Fx/converse-stream").expect("a stream path");
        assert_eq!(route.model, "m/x");
        assert!(route.streaming);
        assert!(Route::parse("/model/m/invoke").is_none());
        assert_eq!(percent_decode("100%"), "100%", "a stray % is kept");
    }

    #[test]
    fn text_is_cut_on_character_boundaries() {
        assert_eq!(pieces("Hello, world", 4), ["Hell", "o, w", "orld"]);
        assert_eq!(pieces("héllo", 2), ["hé", "ll", "o"]);
        assert!(pieces("", 4).is_empty());
    }

    #[test]
    fn exceptions_in_a_stream_are_named_in_lower_camel_case() {
        assert_eq!(Exception::Throttling.stream_name(), "throttlingException");
        assert_eq!(
            Exception::ModelStreamError.stream_name(),
            "modelStreamErrorException"
        );
    }
}
