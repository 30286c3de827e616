//! `rmcp08-server`: a real third-party SDK server for the broker's warm-up
//! tests, built on the official Rust MCP SDK pinned at rmcp 0.8.5.
//!
//! rmcp 0.8 predates the 2026-07-28 protocol: its stdio server insists that
//! the first message is `initialize` and exits with an error otherwise (for
//! example when the broker probes it with `server/discover`). The tests use
//! it to check that the broker copes with such a server dying during warm-up
//! and falls back to the legacy `initialize` handshake.
//!
//! The handler is written by hand (no SDK macros) to keep compile time low.
//! Tools: `echo` (returns `echo: <message>`) and `pid` (returns the process
//! id, so tests can tell which pooled process served a call).

use std::sync::Arc;

use rmcp08 as rmcp;

use rmcp::model::{
    object, CallToolRequestParam, CallToolResult, Content, Implementation, ListToolsResult,
    PaginatedRequestParam, ServerCapabilities, ServerInfo, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::json;

/// The fixture's `ServerHandler`: one `echo` tool and one `pid` tool.
struct Fixture;

impl ServerHandler for Fixture {
    fn get_info(&self) -> ServerInfo {
        ServerInfo {
            capabilities: ServerCapabilities::builder().enable_tools().build(),
            server_info: Implementation {
                name: "rmcp08-fixture".into(),
                title: None,
                version: env!("CARGO_PKG_VERSION").into(),
                icons: None,
                website_url: None,
            },
            ..ServerInfo::default()
        }
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParam>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParam,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let text = match request.name.as_ref() {
            "echo" => {
                let message = request
                    .arguments
                    .as_ref()
                    .and_then(|args| args.get("message"))
                    .and_then(|message| message.as_str())
                    .ok_or_else(|| {
                        ErrorData::invalid_params("echo needs a string `message`", None)
                    })?;
                format!("echo: {message}")
            }
            "pid" => std::process::id().to_string(),
            other => {
                return Err(ErrorData::invalid_params(
                    format!("unknown tool: {other}"),
                    None,
                ))
            }
        };
        Ok(CallToolResult::success(vec![Content::text(text)]))
    }
}

/// The tools this server lists.
fn tools() -> Vec<Tool> {
    vec![
        Tool::new(
            "echo",
            "Echo the message back",
            Arc::new(object(json!({
                "type": "object",
                "properties": {"message": {"type": "string"}},
                "required": ["message"],
            }))),
        ),
        Tool::new(
            "pid",
            "Return the server's process id",
            Arc::new(object(json!({"type": "object", "properties": {}}))),
        ),
    ]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    Fixture
        .serve(rmcp::transport::stdio())
        .await?
        .waiting()
        .await?;
    Ok(())
}
