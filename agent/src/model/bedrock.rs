//! Amazon Bedrock's Converse and ConverseStream, through the AWS SDK: one model call
//! with the conversation, the system prompt and the tools, and what came back —
//! blocks, stop reason, token usage — with every failure put in words that say what
//! to do.

use std::time::{Duration, Instant};

use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::types as bt;
use aws_smithy_types::{Document, Number};
use serde_json::Value;

use super::conversation::{Block, Role, Turn};
use super::tools::ToolDef;
use crate::config::ModelConfig;

/// The most text and tool input one answer may hold, whatever `max-tokens` says: a
/// model's answer is bounded by its output tokens (4 bytes each, give or take), and an
/// endpoint that sends far more is not a model to trust with the agent's memory.
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Tokens one call used, as Bedrock reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

/// What one model call returned.
#[derive(Debug, Clone)]
pub struct Reply {
    pub turn: Turn,
    /// `end_turn`, `tool_use`, `max_tokens`, ...
    pub stop_reason: String,
    /// What Bedrock counted, `None` when the reply did not say (the ledger then takes
    /// an estimate).
    pub usage: Option<Usage>,
    pub latency: Duration,
}

impl Reply {
    pub fn wants_tools(&self) -> bool {
        self.turn
            .blocks
            .iter()
            .any(|b| matches!(b, Block::ToolUse { .. }))
    }
}

/// Why a model call failed, in words for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error(
        "no AWS credentials for Bedrock: on EC2 attach an instance role allowed bedrock:InvokeModel and bedrock:InvokeModelWithResponseStream; elsewhere set them in the agent's environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) ({0})"
    )]
    NoCredentials(String),
    #[error(
        "no AWS region for Bedrock: set [model] region in /etc/devos/agent.toml (on a DevOS image: [agent.config.model] region in its spec, then build and update), or AWS_REGION for the agent"
    )]
    NoRegion,
    #[error(
        "Bedrock denied access to model {model} in {region}: {message} — allow bedrock:InvokeModel and bedrock:InvokeModelWithResponseStream on it for the agent's role, and enable access to the model in the Bedrock console (Model access) of that region"
    )]
    AccessDenied {
        model: String,
        region: String,
        message: String,
    },
    #[error(
        "Bedrock has no model {model} in {region}: {message} — check [model] small/large (an inference profile id such as {example}) and [model] region"
    )]
    NotFound {
        model: String,
        region: String,
        message: String,
        example: &'static str,
    },
    #[error(
        "Bedrock is throttling model calls ({message}); tried {attempts} times with backoff — try again in a minute, or raise the quota (Service Quotas, Amazon Bedrock)"
    )]
    Throttled { message: String, attempts: u32 },
    #[error("the conversation is too long for model {model}: {message}")]
    TooLong { model: String, message: String },
    #[error("model {model} is not ready yet ({message}); try again in a minute")]
    NotReady { model: String, message: String },
    #[error("model {model} failed while answering ({message}); try again")]
    ModelFailed { model: String, message: String },
    #[error("Bedrock refused the request to {model}: {message}")]
    Invalid { model: String, message: String },
    #[error("Bedrock is unavailable ({code}: {message}); try again later")]
    Unavailable { code: String, message: String },
    #[error("cannot reach Bedrock at {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("the model's answer could not be read: {0}")]
    BadReply(String),
    #[error("the model sent nothing for {}s; try again", .0.as_secs())]
    Silent(Duration),
}

/// The longest a streamed answer may go without a word (a model thinks before its
/// first one, but not this long), and a whole answer that is not streamed may take.
const SILENCE: Duration = Duration::from_secs(120);
const WHOLE_ANSWER: Duration = Duration::from_secs(600);
/// The most blocks (text, tool calls) one answer may have.
const MAX_BLOCKS: usize = 1024;

/// `answer`, or [`ModelError::Silent`] when it takes longer than `limit`.
async fn within<T>(
    limit: Duration,
    answer: impl Future<Output = Result<T, ModelError>>,
) -> Result<T, ModelError> {
    tokio::time::timeout(limit, answer)
        .await
        .unwrap_or(Err(ModelError::Silent(limit)))
}

impl ModelError {
    pub fn is_too_long(&self) -> bool {
        matches!(self, ModelError::TooLong { .. })
    }

    /// Whether the model may have written (and Bedrock billed) an answer that was not
    /// taken: it was given up on as silent, or what came could not be read.
    pub fn may_have_answered(&self) -> bool {
        matches!(self, ModelError::Silent(_) | ModelError::BadReply(_))
    }
}

/// A Bedrock Runtime client for `config`, with the SDK's credential chain and its
/// standard retries (exponential backoff with jitter) for throttling and brief
/// unavailability.
pub async fn client(config: &ModelConfig) -> Result<(Client, String), ModelError> {
    let (shared, region) = sdk_config(config).await?;
    let mut builder = aws_sdk_bedrockruntime::config::Builder::from(&shared);
    if !config.endpoint_url.is_empty() {
        builder = builder.endpoint_url(&config.endpoint_url);
    }
    Ok((Client::from_conf(builder.build()), region))
}

/// The SDK's configuration for `config` (its region, else the environment's; the
/// credential chain) and the region.
async fn sdk_config(config: &ModelConfig) -> Result<(aws_config::SdkConfig, String), ModelError> {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).retry_config(
        aws_config::retry::RetryConfig::standard().with_max_attempts(config.max_attempts),
    );
    if !config.region.is_empty() {
        loader = loader.region(aws_config::Region::new(config.region.clone()));
    }
    let shared = loader.load().await;
    let region = shared
        .region()
        .map(|r| r.to_string())
        .ok_or(ModelError::NoRegion)?;
    Ok((shared, region))
}

/// Whether a model call could be made now: a region, and credentials the SDK's chain
/// finds within `limit` (resolved, never sent anywhere: Bedrock is not called, so
/// whether they are allowed to call the models shows only on a request). The region,
/// or what is missing in words.
pub async fn ready(config: &ModelConfig, limit: Duration) -> Result<String, String> {
    use aws_sdk_bedrockruntime::config::ProvideCredentials;
    let check = async {
        let (shared, region) = sdk_config(config).await?;
        let provider = shared
            .credentials_provider()
            .ok_or_else(|| ModelError::NoCredentials("the SDK has no credential chain".into()))?;
        provider
            .provide_credentials()
            .await
            .map_err(|e| ModelError::NoCredentials(DisplayErrorContext(&e).to_string()))?;
        Ok::<_, ModelError>(region)
    };
    // (The region can come from instance metadata too: the whole look is bounded.)
    match tokio::time::timeout(limit, check).await {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the AWS SDK found no region and credentials within {} s (does instance metadata answer? on EC2 attach an instance role; elsewhere set [model] region and the agent's AWS credentials)",
            limit.as_secs()
        )),
    }
}

/// One model call's parameters.
pub struct Call<'a> {
    pub model: &'a str,
    pub region: &'a str,
    pub endpoint: &'a str,
    pub system: &'a str,
    pub tools: &'a [ToolDef],
    pub turns: &'a [Turn],
    pub max_tokens: u32,
    pub temperature: f32,
    pub caching: bool,
    pub stream: bool,
    pub max_attempts: u32,
}

/// Whether `model` takes cache points (prompt caching on Bedrock).
pub fn supports_caching(model: &str) -> bool {
    let claude_with_caching = model.contains("anthropic.claude")
        && ![
            "claude-v2",
            "claude-instant",
            "claude-3-haiku",
            "claude-3-sonnet",
            "claude-3-opus",
            "claude-3-5-sonnet",
        ]
        .iter()
        .any(|old| model.contains(old));
    claude_with_caching || model.contains("amazon.nova")
}

/// Call the model; text is passed to `on_text` as it arrives (all at once without
/// streaming).
///
/// `on_stream` is given each piece of text as it comes (to show) and the bytes of
/// text and tool input so far (what a call cut off is billed for).
pub async fn converse(
    client: &Client,
    call: &Call<'_>,
    mut on_stream: impl FnMut(&str, usize),
) -> Result<Reply, ModelError> {
    let started = Instant::now();
    let messages = call
        .turns
        .iter()
        .map(message)
        .collect::<Result<Vec<_>, _>>()?;
    let cache = call.caching && supports_caching(call.model);
    let mut system = vec![bt::SystemContentBlock::Text(call.system.to_owned())];
    let mut tools = call.tools.iter().map(tool).collect::<Result<Vec<_>, _>>()?;
    if cache {
        system.push(bt::SystemContentBlock::CachePoint(cache_point()?));
        tools.push(bt::Tool::CachePoint(cache_point()?));
    }
    let tool_config = bt::ToolConfiguration::builder()
        .set_tools(Some(tools))
        .build()
        .map_err(|e| ModelError::BadReply(e.to_string()))?;
    let inference = bt::InferenceConfiguration::builder()
        .max_tokens(call.max_tokens.min(i32::MAX as u32) as i32)
        .temperature(call.temperature)
        .build();
    // Converse and ConverseStream take the same input through builders of two types.
    macro_rules! send {
        ($operation:expr) => {
            $operation
                .model_id(call.model)
                .set_messages(Some(messages))
                .set_system(Some(system))
                .tool_config(tool_config)
                .inference_config(inference)
                .send()
                .await
                // (An answer that came but could not be read is the model's, not a
                // connection's.)
                .map_err(|e| match e.raw_response() {
                    Some(r) if r.status().is_success() => ModelError::BadReply(causes(&e)),
                    _ => map_error(&e, call),
                })?
        };
    }
    // (A server that stops answering holds the caller's slot and budget no longer.)
    let mut reply = if call.stream {
        let mut out = within(SILENCE, async { Ok(send!(client.converse_stream())) }).await?;
        let mut reader = StreamReader::default();
        loop {
            let next = async { out.stream.recv().await.map_err(|e| map_error(&e, call)) };
            let Some(event) = within(SILENCE, next).await? else {
                break;
            };
            reader.take(event, &mut on_stream)?;
        }
        reader.finish()?
    } else {
        let out = within(WHOLE_ANSWER, async { Ok(send!(client.converse())) }).await?;
        let mut turn = match out.output {
            Some(bt::ConverseOutput::Message(m)) => turn_of(&m)?,
            _ => return Err(ModelError::BadReply("no message in the reply".into())),
        };
        // (Counted as a stream is: text, tool ids, names and input, and parts.)
        let bytes: usize = turn
            .blocks
            .iter()
            .map(|b| match b {
                Block::Text { text } => text.len(),
                Block::ToolUse { id, name, input } => {
                    id.len() + name.len() + input.to_string().len()
                }
                Block::ToolResult { content, .. } => content.len(),
            })
            .sum();
        if bytes > MAX_ANSWER_BYTES || turn.blocks.len() > MAX_BLOCKS {
            return Err(too_large());
        }
        for block in &mut turn.blocks {
            if let Block::ToolUse { input, .. } = block {
                *input = kept_input(std::mem::take(input));
            }
        }
        on_stream(&turn.text(), bytes);
        Reply {
            turn,
            stop_reason: out.stop_reason.as_str().to_owned(),
            usage: out.usage.as_ref().map(usage_of),
            latency: Duration::ZERO,
        }
    };
    reply.latency = started.elapsed();
    Ok(reply)
}

fn cache_point() -> Result<bt::CachePointBlock, ModelError> {
    bt::CachePointBlock::builder()
        .r#type(bt::CachePointType::Default)
        .build()
        .map_err(|e| ModelError::BadReply(e.to_string()))
}

fn tool(def: &ToolDef) -> Result<bt::Tool, ModelError> {
    bt::ToolSpecification::builder()
        .name(def.name)
        .description(def.description)
        .input_schema(bt::ToolInputSchema::Json(document(&def.schema)))
        .build()
        .map(bt::Tool::ToolSpec)
        .map_err(|e| ModelError::BadReply(e.to_string()))
}

fn message(turn: &Turn) -> Result<bt::Message, ModelError> {
    let content = turn
        .blocks
        .iter()
        .map(|b| {
            Ok(match b {
                Block::Text { text } => bt::ContentBlock::Text(text.clone()),
                Block::ToolUse { id, name, input } => bt::ContentBlock::ToolUse(
                    bt::ToolUseBlock::builder()
                        .tool_use_id(id)
                        .name(name)
                        // (Input that was not a JSON object goes back as one.)
                        .input(document(&match input {
                            Value::Object(_) => input.clone(),
                            other => serde_json::json!({ "unparsed-input": other }),
                        }))
                        .build()
                        .map_err(|e| ModelError::BadReply(e.to_string()))?,
                ),
                Block::ToolResult { id, ok, content } => bt::ContentBlock::ToolResult(
                    bt::ToolResultBlock::builder()
                        .tool_use_id(id)
                        .content(bt::ToolResultContentBlock::Text(content.clone()))
                        .status(if *ok {
                            bt::ToolResultStatus::Success
                        } else {
                            bt::ToolResultStatus::Error
                        })
                        .build()
                        .map_err(|e| ModelError::BadReply(e.to_string()))?,
                ),
            })
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    bt::Message::builder()
        .role(match turn.role {
            Role::User => bt::ConversationRole::User,
            Role::Assistant => bt::ConversationRole::Assistant,
        })
        .set_content(Some(content))
        .build()
        .map_err(|e| ModelError::BadReply(e.to_string()))
}

fn turn_of(m: &bt::Message) -> Result<Turn, ModelError> {
    let blocks = m
        .content
        .iter()
        .filter_map(|b| match b {
            bt::ContentBlock::Text(text) => Some(Block::Text { text: text.clone() }),
            bt::ContentBlock::ToolUse(t) => Some(Block::ToolUse {
                id: t.tool_use_id.clone(),
                name: t.name.clone(),
                input: value(&t.input),
            }),
            // (Reasoning and citations are the model's own; nothing to act on.)
            _ => None,
        })
        .collect();
    Ok(Turn {
        role: Role::Assistant,
        blocks,
    })
}

fn usage_of(u: &bt::TokenUsage) -> Usage {
    let n = |v: i32| v.max(0) as u64;
    Usage {
        input: n(u.input_tokens),
        output: n(u.output_tokens),
        cache_read: n(u.cache_read_input_tokens.unwrap_or(0)),
        cache_write: n(u.cache_write_input_tokens.unwrap_or(0)),
    }
}

/// The streamed events of one reply, put back together.
#[derive(Default)]
struct StreamReader {
    /// Blocks by index: text so far, or a tool call and its input JSON so far.
    blocks: std::collections::BTreeMap<i32, Partial>,
    stop_reason: Option<String>,
    usage: Option<Usage>,
    /// Bytes of text and tool input so far.
    bytes: usize,
}

/// The most levels of arrays and objects a tool input may have. The conversation it
/// joins is kept as JSON and read back by a parser that follows 128 levels, a few of
/// them the conversation's own; no tool's input has more than three.
const MAX_INPUT_DEPTH: usize = 64;

/// `input`, or in its place a note the tool call fails on when it is nested deeper than
/// [`MAX_INPUT_DEPTH`] (kept, it would leave a conversation that cannot be read again).
fn kept_input(input: Value) -> Value {
    fn depth(v: &Value) -> usize {
        match v {
            Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    if depth(&input) > MAX_INPUT_DEPTH {
        Value::String(format!(
            "(not kept: the input was nested more than {MAX_INPUT_DEPTH} levels deep)"
        ))
    } else {
        input
    }
}

/// An answer larger than any model's.
fn too_large() -> ModelError {
    ModelError::BadReply(format!(
        "the answer is larger than {} MiB or has more than {MAX_BLOCKS} parts, more than any model writes; is [model] endpoint-url a model endpoint?",
        MAX_ANSWER_BYTES >> 20
    ))
}

enum Partial {
    Text(String),
    Tool {
        id: String,
        name: String,
        input: String,
    },
}

impl StreamReader {
    fn take(
        &mut self,
        event: bt::ConverseStreamOutput,
        on_stream: &mut impl FnMut(&str, usize),
    ) -> Result<(), ModelError> {
        match event {
            bt::ConverseStreamOutput::ContentBlockStart(e) => {
                if let Some(bt::ContentBlockStart::ToolUse(t)) = e.start {
                    self.bytes += t.tool_use_id.len() + t.name.len();
                    if self.bytes > MAX_ANSWER_BYTES || self.blocks.len() >= MAX_BLOCKS {
                        return Err(too_large());
                    }
                    self.blocks.insert(
                        e.content_block_index,
                        Partial::Tool {
                            id: t.tool_use_id,
                            name: t.name,
                            input: String::new(),
                        },
                    );
                }
            }
            bt::ConverseStreamOutput::ContentBlockDelta(e) => {
                self.bytes += match &e.delta {
                    Some(bt::ContentBlockDelta::Text(t)) => t.len(),
                    Some(bt::ContentBlockDelta::ToolUse(t)) => t.input.len(),
                    _ => 0,
                };
                if self.bytes > MAX_ANSWER_BYTES
                    || self.blocks.len() >= MAX_BLOCKS
                        && !self.blocks.contains_key(&e.content_block_index)
                {
                    return Err(too_large());
                }
                let slot = self.blocks.entry(e.content_block_index);
                match e.delta {
                    Some(bt::ContentBlockDelta::Text(t)) => {
                        on_stream(&t, self.bytes);
                        match slot.or_insert_with(|| Partial::Text(String::new())) {
                            Partial::Text(s) => s.push_str(&t),
                            Partial::Tool { .. } => {
                                return Err(ModelError::BadReply("text inside a tool call".into()));
                            }
                        }
                    }
                    Some(bt::ContentBlockDelta::ToolUse(t)) => match slot {
                        std::collections::btree_map::Entry::Occupied(mut o) => {
                            if let Partial::Tool { input, .. } = o.get_mut() {
                                input.push_str(&t.input);
                            }
                            on_stream("", self.bytes);
                        }
                        std::collections::btree_map::Entry::Vacant(_) => {
                            return Err(ModelError::BadReply(
                                "tool input before its tool call started".into(),
                            ));
                        }
                    },
                    _ => {}
                }
            }
            bt::ConverseStreamOutput::MessageStop(e) => {
                self.stop_reason = Some(e.stop_reason.as_str().to_owned());
            }
            bt::ConverseStreamOutput::Metadata(e) => {
                if let Some(u) = &e.usage {
                    self.usage = Some(usage_of(u));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(self) -> Result<Reply, ModelError> {
        let stop_reason = self
            .stop_reason
            .ok_or_else(|| ModelError::BadReply("the stream ended without a stop reason".into()))?;
        let blocks = self
            .blocks
            .into_values()
            .map(|p| match p {
                Partial::Text(text) => Block::Text { text },
                Partial::Tool { id, name, input } => Block::ToolUse {
                    id,
                    name,
                    // Input that is not JSON stays as text: the tool call gets an error.
                    input: if input.trim().is_empty() {
                        Value::Object(Default::default())
                    } else {
                        serde_json::from_str(&input).map_or(Value::String(input), kept_input)
                    },
                },
            })
            .collect();
        Ok(Reply {
            turn: Turn {
                role: Role::Assistant,
                blocks,
            },
            stop_reason,
            usage: self.usage,
            latency: Duration::ZERO,
        })
    }
}

/// An error and its causes on one line (not the SDK's dump of the whole response).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        text = format!("{text}: {cause}");
        next = cause.source();
    }
    text
}

/// Put an SDK failure in words (see [`ModelError`]).
fn map_error<E, R>(e: &SdkError<E, R>, call: &Call) -> ModelError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let model = call.model.to_owned();
    let message = e
        .message()
        .map(str::to_owned)
        .unwrap_or_else(|| DisplayErrorContext(e).to_string());
    match e.code() {
        Some(
            "AccessDeniedException"
            | "UnrecognizedClientException"
            | "MissingAuthenticationTokenException",
        ) => ModelError::AccessDenied {
            model,
            region: call.region.to_owned(),
            message,
        },
        Some("ResourceNotFoundException") => ModelError::NotFound {
            model,
            region: call.region.to_owned(),
            message,
            example: crate::config::HAIKU_4_5,
        },
        Some("ThrottlingException" | "throttlingException" | "ServiceQuotaExceededException") => {
            ModelError::Throttled {
                message,
                attempts: call.max_attempts,
            }
        }
        Some("ModelNotReadyException") => ModelError::NotReady { model, message },
        Some("ValidationException" | "validationException") if too_long(&message) => {
            ModelError::TooLong { model, message }
        }
        Some("ValidationException" | "validationException") => {
            ModelError::Invalid { model, message }
        }
        Some(
            "ModelErrorException"
            | "modelStreamErrorException"
            | "ModelStreamErrorException"
            | "ModelTimeoutException"
            | "modelTimeoutException",
        ) => ModelError::ModelFailed { model, message },
        Some(code) => ModelError::Unavailable {
            code: code.to_owned(),
            message,
        },
        None => {
            let detail = DisplayErrorContext(e).to_string();
            if detail.contains("credentials") || detail.contains("Credentials") {
                ModelError::NoCredentials(detail)
            } else {
                ModelError::Unreachable {
                    endpoint: if call.endpoint.is_empty() {
                        format!("bedrock-runtime.{}.amazonaws.com", call.region)
                    } else {
                        call.endpoint.to_owned()
                    },
                    message: detail,
                }
            }
        }
    }
}

/// Whether a validation message says the input is too long for the model.
fn too_long(message: &str) -> bool {
    let m = message.to_lowercase();
    [
        "too long",
        "too many tokens",
        "context length",
        "context window",
        "maximum context",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// JSON as the SDK's document type.
pub fn document(v: &Value) -> Document {
    match v {
        Value::Null => Document::Null,
        Value::Bool(b) => Document::Bool(*b),
        Value::Number(n) => Document::Number(if let Some(u) = n.as_u64() {
            Number::PosInt(u)
        } else if let Some(i) = n.as_i64() {
            Number::NegInt(i)
        } else {
            Number::Float(n.as_f64().unwrap_or(0.0))
        }),
        Value::String(s) => Document::String(s.clone()),
        Value::Array(a) => Document::Array(a.iter().map(document).collect()),
        Value::Object(o) => {
            Document::Object(o.iter().map(|(k, v)| (k.clone(), document(v))).collect())
        }
    }
}

/// The SDK's document type as JSON.
pub fn value(d: &Document) -> Value {
    match d {
        Document::Null => Value::Null,
        Document::Bool(b) => Value::Bool(*b),
        Document::Number(Number::PosInt(u)) => Value::from(*u),
        Document::Number(Number::NegInt(i)) => Value::from(*i),
        Document::Number(Number::Float(f)) => Value::from(*f),
        Document::String(s) => Value::String(s.clone()),
        Document::Array(a) => Value::Array(a.iter().map(value).collect()),
        Document::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), value(v))).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_documents_round_trip() {
        let v = serde_json::json!({"a": [1, -2, 2.5, "x", null, true], "b": {}});
        assert_eq!(value(&document(&v)), v);
    }

    #[test]
    fn a_kept_tool_input_leaves_a_conversation_that_reads_back() {
        use super::super::conversation::Conversation;
        // The deepest input the stream's parser takes.
        let deepest = (1..512)
            .map(|n| format!("{{\"argv\": {}{}}}", "[".repeat(n), "]".repeat(n)))
            .take_while(|text| serde_json::from_str::<Value>(text).is_ok())
            .last()
            .unwrap();
        for input in [deepest.as_str(), r#"{"argv": ["make", "-j4"]}"#] {
            let conversation = Conversation {
                turns: vec![Turn {
                    role: Role::Assistant,
                    blocks: vec![Block::ToolUse {
                        id: "t1".into(),
                        name: "run".into(),
                        input: kept_input(serde_json::from_str(input).unwrap()),
                    }],
                }],
            };
            let stored = serde_json::to_string(&conversation.turns).unwrap();
            let read: Vec<Turn> = serde_json::from_str(&stored).expect("reads back");
            assert_eq!(read, conversation.turns);
        }
        assert_eq!(
            kept_input(serde_json::json!({"argv": ["make"]})),
            serde_json::json!({"argv": ["make"]})
        );
        assert!(kept_input(serde_json::from_str(&deepest).unwrap()).is_string());
    }

    #[test]
    fn caching_is_asked_only_of_models_that_have_it() {
        assert!(supports_caching(crate::config::HAIKU_4_5));
        assert!(supports_caching(crate::config::SONNET_4_5));
        assert!(supports_caching("us.amazon.nova-pro-v1:0"));
        assert!(!supports_caching("anthropic.claude-3-haiku-20240307-v1:0"));
        assert!(!supports_caching("meta.llama3-70b-instruct-v1:0"));
    }
}
