//! A conversation with the model as the agent keeps it: turns of text, tool calls
//! and tool results, in a form that is saved between requests (`devos run
//! --continue`) and turned into Bedrock's message types only when it is sent.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    User,
    Assistant,
}

/// One block of a turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Block {
    Text {
        text: String,
    },
    /// The model asks for a tool; `input` is the JSON it sent (an object, or the raw
    /// text when it was not valid JSON).
    ToolUse {
        id: String,
        name: String,
        input: serde_json::Value,
    },
    /// What the agent answers for a tool call.
    ToolResult {
        id: String,
        ok: bool,
        content: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub blocks: Vec<Block>,
}

impl Turn {
    pub fn user_text(text: String) -> Turn {
        Turn {
            role: Role::User,
            blocks: vec![Block::Text { text }],
        }
    }

    /// The turn's text blocks, joined.
    pub fn text(&self) -> String {
        self.blocks
            .iter()
            .filter_map(|b| match b {
                Block::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("")
    }
}

/// A conversation: the turns so far, oldest first. It always starts with the user's
/// first request, roles alternate, and every tool call is answered in the next turn.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub turns: Vec<Turn>,
}

/// Where the context given with the first request starts in its text.
pub const CONTEXT_START: &str = "\n\n<context>\n";

/// What an old tool result is cut to when a conversation is trimmed, and what is said
/// after it.
const TRIMMED_RESULT: usize = 200;
const CUT: &str = "\n[cut: the conversation was too long for the model]";

impl Conversation {
    /// Bytes of text the turns carry (a proxy for their tokens: about 4 bytes each).
    pub fn size(&self) -> usize {
        self.turns
            .iter()
            .flat_map(|t| &t.blocks)
            .map(|b| match b {
                Block::Text { text } => text.len(),
                Block::ToolUse { name, input, .. } => name.len() + input.to_string().len(),
                Block::ToolResult { content, .. } => content.len(),
            })
            .sum()
    }

    /// Add the user's next words. Roles must alternate and every tool call must be
    /// answered, whatever ended the last request: tool calls left without a result
    /// (the agent stopped while they ran) are answered as not run, and words that
    /// follow a user turn (the last request ended before the model answered) join it.
    pub fn add_user_text(&mut self, text: String) {
        let unanswered: Vec<Block> = match self.turns.last() {
            Some(t) if t.role == Role::Assistant => t
                .blocks
                .iter()
                .filter_map(|b| match b {
                    Block::ToolUse { id, .. } => Some(Block::ToolResult {
                        id: id.clone(),
                        ok: false,
                        content: "not run: the request ended before this call".into(),
                    }),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        if !unanswered.is_empty() {
            self.turns.push(Turn {
                role: Role::User,
                blocks: unanswered,
            });
        }
        match self.turns.last_mut() {
            Some(t) if t.role == Role::User => t.blocks.push(Block::Text { text }),
            _ => self.turns.push(Turn::user_text(text)),
        }
    }

    /// Make the conversation fit a model that said it was too long: old tool results
    /// (all but the last turn's) are cut short, then the oldest exchanges after the
    /// first request are dropped, in pairs so every tool call keeps its result, until
    /// it is at most half its size. Returns whether anything was removed.
    pub fn trim(&mut self) -> bool {
        let before = self.size();
        let last = self.turns.len().saturating_sub(1);
        for turn in &mut self.turns[..last] {
            for block in &mut turn.blocks {
                if let Block::ToolResult { content, .. } = block
                    && content.len() > TRIMMED_RESULT + CUT.len()
                {
                    content.truncate(crate::executor::head(content, TRIMMED_RESULT).len());
                    content.push_str(CUT);
                }
            }
        }
        // Turns 1.. alternate assistant, user; keep the first request and the last
        // exchange.
        while self.size() > before / 2 && self.turns.len() > 3 {
            self.turns.drain(1..3);
        }
        // Last, the context that came with the first request.
        if self.size() > before / 2
            && let Some(Block::Text { text }) =
                self.turns.first_mut().and_then(|t| t.blocks.first_mut())
            && let Some(at) = text.find(CONTEXT_START)
        {
            text.truncate(at);
        }
        self.size() < before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(i: usize, result: &str) -> [Turn; 2] {
        [
            Turn {
                role: Role::Assistant,
                blocks: vec![Block::ToolUse {
                    id: format!("t{i}"),
                    name: "read_file".into(),
                    input: serde_json::json!({ "path": "x" }),
                }],
            },
            Turn {
                role: Role::User,
                blocks: vec![Block::ToolResult {
                    id: format!("t{i}"),
                    ok: true,
                    content: result.into(),
                }],
            },
        ]
    }

    #[test]
    fn follow_ups_keep_roles_alternating_and_every_call_answered() {
        let mut c = Conversation {
            turns: vec![Turn::user_text("a".into())],
        };
        c.add_user_text("b".into());
        assert_eq!(c.turns.len(), 1, "joins the unanswered request");
        c.turns.push(exchange(1, "x")[0].clone());
        c.add_user_text("c".into());
        let roles: Vec<Role> = c.turns.iter().map(|t| t.role).collect();
        assert_eq!(roles, [Role::User, Role::Assistant, Role::User]);
        assert!(
            matches!(&c.turns[2].blocks[0], Block::ToolResult { id, ok: false, .. } if id == "t1")
        );
        assert_eq!(c.turns[2].text(), "c");
    }

    #[test]
    fn trimming_keeps_the_request_pairs_and_the_last_exchange() {
        let mut c = Conversation {
            turns: vec![Turn::user_text("fix the build".into())],
        };
        for i in 0..6 {
            c.turns.extend(exchange(i, &"x".repeat(5000)));
        }
        assert!(c.trim());
        assert_eq!(c.turns[0].text(), "fix the build");
        assert_eq!(c.turns.len() % 2, 1, "{c:?}");
        for pair in c.turns[1..].chunks(2) {
            let (Block::ToolUse { id: a, .. }, Block::ToolResult { id: b, .. }) =
                (&pair[0].blocks[0], &pair[1].blocks[0])
            else {
                panic!("{pair:?}");
            };
            assert_eq!(a, b);
        }
        let Some(Block::ToolResult { content, .. }) = c.turns.last().map(|t| &t.blocks[0]) else {
            panic!()
        };
        assert_eq!(content.len(), 5000, "the last result is kept whole");

        let mut alone = Conversation {
            turns: vec![Turn::user_text(crate::model::first_turn(
                "hi",
                &serde_json::json!({"kind": "x".repeat(100)}),
            ))],
        };
        assert!(alone.trim(), "the first request's context goes last");
        assert_eq!(alone.turns[0].text(), "hi");
    }
}
