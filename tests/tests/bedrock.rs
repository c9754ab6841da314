//! The Bedrock stand-in driven by the real `aws-sdk-bedrockruntime` client: what the
//! SDK makes of its streams, JSON answers and errors is what tests that script a model
//! with it rely on.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::config::retry::RetryConfig;
use aws_sdk_bedrockruntime::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_bedrockruntime::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::operation::converse::ConverseError;
use aws_sdk_bedrockruntime::operation::converse_stream::ConverseStreamError;
use aws_sdk_bedrockruntime::primitives::event_stream::EventReceiver;
use aws_sdk_bedrockruntime::types::error::ConverseStreamOutputError;
use aws_sdk_bedrockruntime::types::{
    CachePointBlock, CachePointType, ContentBlock, ContentBlockDelta, ContentBlockStart,
    ConversationRole, ConverseOutput, ConverseStreamOutput as StreamEvent, InferenceConfiguration,
    Message, StopReason, SystemContentBlock, TokenUsage, Tool, ToolConfiguration, ToolInputSchema,
    ToolResultBlock, ToolResultContentBlock, ToolSpecification, ToolUseBlock,
};
use aws_smithy_types::{Document, Number};
use devos_tests::bedrock::{Exception, NO_REPLY_LEFT, Reply, StandIn, ToolCall, Usage};
use serde_json::{Value, json};

const MODEL: &str = "us.anthropic.claude-haiku-4-5-20251001-v1:0";

/// No test here needs more than a few seconds; a hang fails instead of blocking CI.
const LIMIT: Duration = Duration::from_secs(60);

async fn within_limit<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, test)
        .await
        .unwrap_or_else(|_| panic!("the test did not finish within {}s", LIMIT.as_secs()))
}

/// A client of `standin` with fixed test credentials and no retries, so a scripted
/// throttle surfaces once instead of being retried into the next scripted reply. It is
/// configured directly, so it reads no `~/.aws` file and no `AWS_*` variable.
fn client(standin: &StandIn) -> Client {
    let config = aws_sdk_bedrockruntime::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .endpoint_url(standin.endpoint())
        .retry_config(RetryConfig::disabled())
        .build();
    Client::from_conf(config)
}

fn user_text(text: &str) -> Message {
    Message::builder()
        .role(ConversationRole::User)
        .content(ContentBlock::Text(text.to_owned()))
        .build()
        .expect("a user message")
}

fn document(value: &Value) -> Document {
    match value {
        Value::Null => Document::Null,
        Value::Bool(b) => Document::Bool(*b),
        Value::Number(n) => Document::Number(match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Number::PosInt(u),
            (None, Some(i)) => Number::NegInt(i),
            _ => Number::Float(n.as_f64().unwrap_or_default()),
        }),
        Value::String(s) => Document::String(s.clone()),
        Value::Array(items) => Document::Array(items.iter().map(document).collect()),
        Value::Object(map) => Document::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), document(v)))
                .collect::<HashMap<_, _>>(),
        ),
    }
}

/// What one ConverseStream delivered, event by event.
#[derive(Debug, Default)]
struct Streamed {
    /// The `:event-type` of every event, in order of arrival.
    events: Vec<&'static str>,
    /// When each event arrived.
    arrivals: Vec<Instant>,
    /// Text deltas as (content block index, text), in order.
    texts: Vec<(i32, String)>,
    /// Tool use starts as (content block index, tool use id, tool name).
    tool_starts: Vec<(i32, String, String)>,
    /// Tool input deltas per content block, in order.
    tool_inputs: BTreeMap<i32, Vec<String>>,
    stop_reason: Option<StopReason>,
    usage: Option<TokenUsage>,
}

impl Streamed {
    fn text(&self) -> String {
        self.texts.iter().map(|(_, t)| t.as_str()).collect()
    }

    fn tool_input(&self, index: i32) -> String {
        self.tool_inputs
            .get(&index)
            .map(|pieces| pieces.concat())
            .unwrap_or_default()
    }
}

type StreamFailure =
    SdkError<ConverseStreamOutputError, aws_smithy_types::event_stream::RawMessage>;

/// Read `stream` to its end, or to its first error (returned with what came before).
async fn collect(
    mut stream: EventReceiver<StreamEvent, ConverseStreamOutputError>,
) -> (Streamed, Option<StreamFailure>) {
    let mut seen = Streamed::default();
    loop {
        let event = match stream.recv().await {
            Ok(Some(event)) => event,
            Ok(None) => return (seen, None),
            Err(err) => return (seen, Some(err)),
        };
        seen.arrivals.push(Instant::now());
        let name = match event {
            StreamEvent::MessageStart(_) => "messageStart",
            StreamEvent::ContentBlockStart(start) => {
                if let Some(ContentBlockStart::ToolUse(tool)) = start.start {
                    seen.tool_starts
                        .push((start.content_block_index, tool.tool_use_id, tool.name));
                }
                "contentBlockStart"
            }
            StreamEvent::ContentBlockDelta(delta) => {
                let index = delta.content_block_index;
                match delta.delta {
                    Some(ContentBlockDelta::Text(text)) => seen.texts.push((index, text)),
                    Some(ContentBlockDelta::ToolUse(tool)) => {
                        seen.tool_inputs.entry(index).or_default().push(tool.input);
                    }
                    other => panic!("unexpected delta {other:?}"),
                }
                "contentBlockDelta"
            }
            StreamEvent::ContentBlockStop(_) => "contentBlockStop",
            StreamEvent::MessageStop(stop) => {
                seen.stop_reason = Some(stop.stop_reason);
                "messageStop"
            }
            StreamEvent::Metadata(metadata) => {
                seen.usage = metadata.usage;
                "metadata"
            }
            other => panic!("unexpected event {other:?}"),
        };
        seen.events.push(name);
    }
}

/// Send a ConverseStream request and read its stream to the end.
async fn converse_stream(client: &Client) -> Streamed {
    let output = client
        .converse_stream()
        .model_id(MODEL)
        .messages(user_text("Hello"))
        .send()
        .await
        .expect("ConverseStream answers");
    let (streamed, failure) = collect(output.stream).await;
    assert!(failure.is_none(), "the stream failed: {failure:?}");
    streamed
}

/// Send a ConverseStream request that must fail before its stream starts.
async fn converse_stream_error(client: &Client) -> SdkError<ConverseStreamError> {
    match client
        .converse_stream()
        .model_id(MODEL)
        .messages(user_text("Hello"))
        .send()
        .await
    {
        Ok(output) => panic!("expected an error, the stream started: {output:?}"),
        Err(err) => err,
    }
}

async fn converse_error(client: &Client) -> SdkError<ConverseError> {
    match client
        .converse()
        .model_id(MODEL)
        .messages(user_text("Hello"))
        .send()
        .await
    {
        Ok(output) => panic!("expected an error, got {output:?}"),
        Err(err) => err,
    }
}

fn status<E>(err: &SdkError<E>) -> u16 {
    err.raw_response()
        .map(|response| response.status().as_u16())
        .unwrap_or_default()
}

#[tokio::test]
async fn streamed_text_arrives_as_ordered_deltas_with_stop_reason_and_usage() {
    within_limit(async {
        let standin = StandIn::start().expect("the stand-in starts");
        standin.push(Reply::text("Hello from the stand-in.").with_usage(Usage {
            input: 200,
            output: 12,
            cache_read: 1000,
            cache_write: 50,
        }));
        let streamed = converse_stream(&client(&standin)).await;

        assert_eq!(streamed.text(), "Hello from the stand-in.");
        assert!(
            streamed.texts.len() > 3,
            "the text comes in small pieces: {:?}",
            streamed.texts
        );
        assert!(streamed.texts.iter().all(|(index, _)| *index == 0));
        let deltas = streamed.texts.len();
        let mut expected = vec!["messageStart"];
        expected.extend(std::iter::repeat_n("contentBlockDelta", deltas));
        expected.extend(["contentBlockStop", "messageStop", "metadata"]);
        assert_eq!(streamed.events, expected);
        assert_eq!(streamed.stop_reason, Some(StopReason::EndTurn));
        let usage = streamed.usage.expect("the metadata event has usage");
        assert_eq!(usage.input_tokens, 200);
        assert_eq!(usage.output_tokens, 12);
        assert_eq!(usage.cache_read_input_tokens, Some(1000));
        assert_eq!(usage.cache_write_input_tokens, Some(50));
        assert_eq!(usage.total_tokens, 1262);
        assert_eq!(standin.remaining(), 0);
    })
    .await;
}

#[tokio::test]
async fn streamed_tool_use_carries_name_id_and_input_split_over_deltas() {
    within_limit(async {
        let standin = StandIn::start().expect("the stand-in starts");
        let client = client(&standin);
        let input = json!({ "path": "/etc/hostname", "limit": 20 });
        standin.push(Reply::tool("read_file", input.clone()).with_leading_text("Let me look."));
        standin.push(Reply::tools(vec![
            ToolCall::new("read_file", json!({ "path": "a.txt" })),
            ToolCall::new("list_dir", json!({ "path": "src", "depth": 2 })),
        ]));

        let first = converse_stream(&client).await;
        assert_eq!(first.text(), "Let me look.");
        assert_eq!(
            first.tool_starts,
            [(1, "tooluse_1".to_owned(), "read_file".to_owned())]
        );
        assert!(
            first.tool_inputs[&1].len() > 1,
            "the input comes in pieces: {:?}",
            first.tool_inputs
        );
        let reassembled: Value =
            serde_json::from_str(&first.tool_input(1)).expect("the input pieces form JSON");
        assert_eq!(reassembled, input);
        assert_eq!(first.stop_reason, Some(StopReason::ToolUse));
        assert_eq!(
            first.events[..3],
            ["messageStart", "contentBlockDelta", "contentBlockDelta"],
            "no contentBlockStart for text"
        );

        let second = converse_stream(&client).await;
        assert!(second.texts.is_empty());
        assert_eq!(
            second.tool_starts,
            [
                (0, "tooluse_2".to_owned(), "read_file".to_owned()),
                (1, "tooluse_3".to_owned(), "list_dir".to_owned()),
            ]
        );
        let second_input: Value =
            serde_json::from_str(&second.tool_input(1)).expect("the input pieces form JSON");
        assert_eq!(second_input, json!({ "path": "src", "depth": 2 }));
        assert_eq!(second.stop_reason, Some(StopReason::ToolUse));
    })
    .await;
}

#[tokio::test]
async fn raw_tool_input_is_streamed_verbatim_even_when_malformed() {
    within_limit(async {
        let standin = StandIn::start().expect("the stand-in starts");
        let raw = r#"{"path": "notes.txt", "content": "unterminated"#;
        standin.push(Reply::raw_tool("write_file", raw));
        let streamed = converse_stream(&client(&standin)).await;
        assert_eq!(streamed.tool_input(0), raw);
        assert_eq!(streamed.stop_reason, Some(StopReason::ToolUse));
    })
    .await;
}

#[tokio::test]
async fn converse_returns_text_and_tool_use_with_a_document_input() {
    within_limit(async {
        let standin = StandIn::start().expect("the stand-in starts");
        let client = client(&standin);
        standin.push(
            Reply::tool("read_file", json!({ "path": "src/main.rs", "limit": 20 }))
                .with_leading_text("Reading it."),
        );
        standin.push(Reply::text("All done."));

        let output = client
            .converse()
            .model_id(MODEL)
            .messages(user_text("Read main.rs"))
            .send()
            .await
            .expect("Converse answers");
        let Some(ConverseOutput::Message(message)) = output.output else {
            panic!("Converse answered no message: {:?}", output.output);
        };
        assert_eq!(message.role, ConversationRole::Assistant);
        assert_eq!(
            message.content[0],
            ContentBlock::Text("Reading it.".to_owned())
        );
        let ContentBlock::ToolUse(ToolUseBlock {
            tool_use_id,
            name,
            input,
            ..
        }) = &message.content[1]
        else {
            panic!("the second block is no tool use: {:?}", message.content);
        };
        assert_eq!(tool_use_id, "tooluse_1");
        assert_eq!(name, "read_file");
        assert_eq!(
            *input,
            document(&json!({ "path": "src/main.rs", "limit": 20 }))
        );
        assert_eq!(output.stop_reason, StopReason::ToolUse);
        let usage = output.usage.expect("Converse reports usage");
        assert_eq!(
            (usage.input_tokens, usage.output_tokens, usage.total_tokens),
            (120, 30, 150)
        );

        let output = client
            .converse()
            .model_id(MODEL)
            .messages(user_text("Thanks"))
            .send()
            .await
            .expect("Converse answers");
        assert_eq!(output.stop_reason, StopReason::EndTurn);
        let Some(ConverseOutput::Message(message)) = output.output else {
            panic!("Converse answered no message");
        };
        assert_eq!(
            message.content,
            [ContentBlock::Text("All done.".to_owned())]
        );
    })
    .await;
}

/// Whether an error is one particular variant, e.g. `is_throttling_exception`.
type IsVariant = fn(&ConverseStreamError) -> bool;

#[tokio::test]
async fn scripted_errors_surface_as_the_sdks_typed_errors() {
    within_limit(async {
        let standin = StandIn::start().expect("the stand-in starts");
        let client = client(&standin);

        standin.push(Reply::throttled());
        let err = converse_stream_error(&client).await;
        assert_eq!(status(&err), 429);
        match err.into_service_error() {
            ConverseStreamError::ThrottlingException(e) => assert_eq!(
                e.message(),
                Some("Too many requests, please wait before trying again.")
            ),
            other => panic!("expected ThrottlingException, got {other:?}"),
        }

        standin.push(Reply::access_denied());
        let err = converse_stream_error(&client).await;
        assert_eq!(status(&err), 403);
        match err.into_service_error() {
            ConverseStreamError::AccessDeniedException(e) => assert_eq!(
                e.message(),
                Some("You don't have access to the model with the specified model ID.")
            ),
            other => panic!("expected AccessDeniedException, got {other:?}"),
        }

        standin.push(Reply::too_long());
        let err = converse_stream_error(&client).await;
        assert_eq!(status(&err), 400);
        match err.into_service_error() {
            ConverseStreamError::ValidationException(e) => {
                assert_eq!(e.message(), Some("Input is too long for requested model."));
            }
            other => panic!("expected ValidationException, got {other:?}"),
        }

        standin.push(Reply::not_ready());
        let err = converse_stream_error(&client).await;
        assert_eq!(status(&err), 429);
        assert!(
            matches!(
                err.into_service_error(),
                ConverseStreamError::ModelNotReadyException(_)
            ),
            "expected ModelNotReadyException"
        );

        let typed: [(Exception, u16, IsVariant); 5] = [
            (Exception::ResourceNotFound, 404, |e| {
                e.is_resource_not_found_exception()
            }),
            (Exception::ServiceUnavailable, 503, |e| {
                e.is_service_unavailable_exception()
            }),
            (Exception::InternalServer, 500, |e| {
                e.is_internal_server_exception()
            }),
            (Exception::ModelTimeout, 408, |e| {
                e.is_model_timeout_exception()
            }),
            (Exception::ModelError, 424, |e| e.is_model_error_exception()),
        ];
        for (exception, expected_status, is_variant) in typed {
            standin.push(Reply::error(exception, "scripted"));
            let err = converse_stream_error(&client).await;
            assert_eq!(status(&err), expected_status, "{exception:?}");
            let err = err.into_service_error();
            assert!(is_variant(&err), "{exception:?} surfaced as {err:?}");
            assert_eq!(err.message(), Some("scripted"));
        }

        // Not modelled for ConverseStream: the SDK keeps the code and message.
        standin.push(Reply::error(Exception::ServiceQuotaExceeded, "quota"));
        let err = converse_stream_error(&client).await;
        assert_eq!(status(&err), 400);
        let err = err.into_service_error();
        assert_eq!(err.code(), Some("ServiceQuotaExceededException"));
        assert_eq!(err.message(), Some("quota"));

        // Converse answers errors the same way.
        standin.push(Reply::throttled());
        assert!(matches!(
            converse_error(&client).await.into_service_error(),
            ConverseError::ThrottlingException(_)
        ));

        // A request the test scripted no reply for fails loudly.
        let err = converse_stream_error(&client).await;
        assert_eq!(status(&err), 500);
        let err = err.into_service_error();
        assert!(err.is_internal_server_exception(), "{err:?}");
        assert_eq!(err.message(), Some(NO_REPLY_LEFT));
    })
    .await;
}

#[tokio::test]
async fn a_mid_stream_exception_surfaces_from_recv_after_the_text() {
    within_limit(async {
        let standin = StandIn::start().expect("the stand-in starts");
        let client = client(&standin);
        standin.push(Reply::mid_stream_exception(
            "The answer is",
            Exception::Throttling,
            "Too many tokens, please wait before trying again.",
        ));
        let output = client
            .converse_stream()
            .model_id(MODEL)
            .messages(user_text("Hello"))
            .send()
            .await
            .expect("the stream starts");
        let (seen, failure) = collect(output.stream).await;
        assert_eq!(seen.text(), "The answer is");
        assert_eq!(seen.stop_reason, None);
        let failure = failure.expect("the stream fails after the text");
        match failure.into_service_error() {
            ConverseStreamOutputError::ThrottlingException(e) => assert_eq!(
                e.message(),
                Some("Too many tokens, please wait before trying again.")
            ),
            other => panic!("expected a ThrottlingException frame, got {other:?}"),
        }

        // Converse has no stream to break: the exception is its HTTP error.
        standin.push(Reply::mid_stream_exception(
            "The answer is",
            Exception::ModelStreamError,
            "The model failed.",
        ));
        let err = converse_error(&client).await;
        assert_eq!(status(&err), 424);
        assert_eq!(
            err.into_service_error().code(),
            Some("ModelStreamErrorException")
        );
    })
    .await;
}

#[tokio::test]
async fn an_unsigned_request_is_refused_like_the_real_service() {
    within_limit(async {
        let standin = StandIn::start().expect("the stand-in starts");
        standin.push(Reply::text("not for unsigned requests"));
        let address = standin.endpoint().replace("http://", "");
        let answer = tokio::task::spawn_blocking(move || {
            let mut socket = std::net::TcpStream::connect(&address).expect("connect");
            socket
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("set a read timeout");
            let body = r#"{"messages":[]}"#;
            write!(
                socket,
                "POST /model/anthropic.claude%3A0/converse HTTP/1.1\r\n\
                 host: {address}\r\n\
                 content-type: application/json\r\n\
                 content-length: {length}\r\n\
                 connection: close\r\n\r\n{body}",
                length = body.len(),
            )
            .expect("send the request");
            let mut answer = String::new();
            socket.read_to_string(&mut answer).expect("read the answer");
            answer
        })
        .await
        .expect("the request thread");

        let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("x-amzn-errortype: missingauthenticationtokenexception"),
            "{head}"
        );
        let body: Value = serde_json::from_str(body).expect("a JSON body");
        assert_eq!(body, json!({ "message": "Missing Authentication Token" }));
        assert_eq!(standin.remaining(), 1, "a refused request takes no reply");
        let received = standin.requests();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].authorization, None);
        assert_eq!(received[0].model, "anthropic.claude:0");
    })
    .await;
}

#[tokio::test]
async fn recorded_requests_hold_what_the_client_sent() {
    within_limit(async {
        let standin = StandIn::start().expect("the stand-in starts");
        standin.push(Reply::text("ok"));
        let cache_point = CachePointBlock::builder()
            .r#type(CachePointType::Default)
            .build()
            .expect("a cache point");
        let read_file = ToolSpecification::builder()
            .name("read_file")
            .description("Read a file")
            .input_schema(ToolInputSchema::Json(document(&json!({
                "type": "object",
                "properties": { "path": { "type": "string" } },
                "required": ["path"],
            }))))
            .build()
            .expect("a tool spec");
        let assistant = Message::builder()
            .role(ConversationRole::Assistant)
            .content(ContentBlock::ToolUse(
                ToolUseBlock::builder()
                    .tool_use_id("tooluse_1")
                    .name("read_file")
                    .input(document(&json!({ "path": "a.txt" })))
                    .build()
                    .expect("a tool use"),
            ))
            .build()
            .expect("an assistant message");
        let tool_result = Message::builder()
            .role(ConversationRole::User)
            .content(ContentBlock::ToolResult(
                ToolResultBlock::builder()
                    .tool_use_id("tooluse_1")
                    .content(ToolResultContentBlock::Text("hello".to_owned()))
                    .build()
                    .expect("a tool result"),
            ))
            .content(ContentBlock::CachePoint(cache_point.clone()))
            .build()
            .expect("a user message");

        converse_stream_with(&client(&standin), |request| {
            request
                .system(SystemContentBlock::Text("You are terse.".to_owned()))
                .system(SystemContentBlock::CachePoint(cache_point.clone()))
                .messages(user_text("Read a.txt"))
                .messages(assistant.clone())
                .messages(tool_result.clone())
                .tool_config(
                    ToolConfiguration::builder()
                        .tools(Tool::ToolSpec(read_file.clone()))
                        .tools(Tool::CachePoint(cache_point.clone()))
                        .build()
                        .expect("a tool config"),
                )
                .inference_config(
                    InferenceConfiguration::builder()
                        .max_tokens(512)
                        .temperature(0.5)
                        .build(),
                )
        })
        .await;

        let received = standin.requests();
        assert_eq!(received.len(), 1);
        let request = &received[0];
        assert_eq!(request.model, MODEL);
        assert!(request.streaming);
        assert!(
            request.path.contains("%3A0/converse-stream"),
            "the model id arrives encoded: {}",
            request.path
        );
        let authorization = request.authorization.as_deref().unwrap_or_default();
        assert!(
            authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKIDTEST/"),
            "{authorization}"
        );
        let body = &request.body;
        assert_eq!(
            body["system"],
            json!([{ "text": "You are terse." }, { "cachePoint": { "type": "default" } }])
        );
        assert_eq!(body["messages"][0]["content"][0]["text"], "Read a.txt");
        assert_eq!(
            body["messages"][1]["content"][0]["toolUse"]["input"],
            json!({ "path": "a.txt" })
        );
        assert_eq!(
            body["messages"][2]["content"][0]["toolResult"],
            json!({ "toolUseId": "tooluse_1", "content": [{ "text": "hello" }] })
        );
        assert_eq!(
            body["messages"][2]["content"][1],
            json!({ "cachePoint": { "type": "default" } })
        );
        assert_eq!(
            body["toolConfig"]["tools"][0]["toolSpec"]["name"],
            "read_file"
        );
        assert_eq!(
            body["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"]["json"]["required"],
            json!(["path"])
        );
        assert_eq!(
            body["toolConfig"]["tools"][1],
            json!({ "cachePoint": { "type": "default" } })
        );
        assert_eq!(
            body["inferenceConfig"],
            json!({ "maxTokens": 512, "temperature": 0.5 })
        );
    })
    .await;
}

/// Send a ConverseStream request shaped by `shape` and read its stream to the end.
async fn converse_stream_with(
    client: &Client,
    shape: impl FnOnce(
        aws_sdk_bedrockruntime::operation::converse_stream::builders::ConverseStreamFluentBuilder,
    ) -> aws_sdk_bedrockruntime::operation::converse_stream::builders::ConverseStreamFluentBuilder,
) -> Streamed {
    let output = shape(client.converse_stream().model_id(MODEL))
        .send()
        .await
        .expect("ConverseStream answers");
    let (streamed, failure) = collect(output.stream).await;
    assert!(failure.is_none(), "the stream failed: {failure:?}");
    streamed
}

#[tokio::test]
async fn frames_reach_the_client_one_at_a_time() {
    within_limit(async {
        let standin = StandIn::start().expect("the stand-in starts");
        let frame_delay = Duration::from_millis(150);
        standin.set_frame_delay(frame_delay);
        standin.push(Reply::text("abcdefghijkl"));
        let streamed = converse_stream(&client(&standin)).await;
        assert_eq!(streamed.text(), "abcdefghijkl");
        // Seven frames, six pauses between them. Had the stand-in sent them together
        // they would arrive together; a client stalled by a busy machine may bunch a
        // few of them, so only half the pacing is required.
        let arrivals = &streamed.arrivals;
        assert_eq!(arrivals.len(), 7, "{:?}", streamed.events);
        let span = arrivals[6] - arrivals[0];
        assert!(
            span >= frame_delay * 3,
            "the frames arrived within {span:?} of each other, not one at a time"
        );
    })
    .await;
}

#[tokio::test]
async fn a_delayed_reply_outlives_a_client_that_gave_up() {
    within_limit(async {
        let standin = StandIn::start().expect("the stand-in starts");
        let client = client(&standin);
        let delay = Duration::from_secs(3);
        standin.push(Reply::text("too late").after(delay));
        standin.push(Reply::text("on time"));

        let first_sent = Instant::now();
        let first = tokio::spawn({
            let client = client.clone();
            async move { converse_stream(&client).await }
        });
        // The client gives up once its request waits at the stand-in.
        let arrived = Instant::now() + Duration::from_secs(10);
        while standin.requests().is_empty() && Instant::now() < arrived {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            standin.requests().len(),
            1,
            "the first request never arrived"
        );
        assert!(!first.is_finished(), "the delayed reply came early");
        first.abort();

        // The delayed reply holds up no other request.
        assert_eq!(converse_stream(&client).await.text(), "on time");
        assert!(
            first_sent.elapsed() < delay,
            "the second request waited for the first one's delay"
        );

        // After the delay the stand-in writes to a closed connection, and serves on.
        tokio::time::sleep_until((first_sent + delay + Duration::from_millis(300)).into()).await;
        standin.push(Reply::text("still here"));
        assert_eq!(converse_stream(&client).await.text(), "still here");
        assert_eq!(standin.requests().len(), 3);

        // Dropping the stand-in does not wait out a pending delay.
        standin.push(Reply::text("never").after(Duration::from_secs(600)));
        let pending = tokio::spawn(async move {
            client
                .converse_stream()
                .model_id(MODEL)
                .messages(user_text("Hello"))
                .send()
                .await
        });
        while standin.requests().len() < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dropping = Instant::now();
        drop(standin);
        assert!(dropping.elapsed() < Duration::from_secs(2));
        let answer = pending.await.expect("the request task");
        match answer {
            Err(err) => assert!(
                err.into_service_error().is_service_unavailable_exception(),
                "a stopped stand-in answers 503"
            ),
            Ok(output) => panic!("a stopped stand-in sent a reply: {output:?}"),
        }
    })
    .await;
}
