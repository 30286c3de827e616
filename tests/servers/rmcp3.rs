//! `rmcp3-server`: a real third-party SDK server for the broker's warm-up
//! tests, built on the official Rust MCP SDK at rmcp 3.11.
//!
//! rmcp 3 speaks the 2026-07-28 protocol: it answers a `server/discover`
//! request sent before any `initialize`, serves stateless requests that
//! carry the protocol version in `_meta`, and still accepts the legacy
//! `initialize` handshake. The tests use it to check that the broker's
//! discover-first warm-up works against a server it did not write.
//!
//! The handler is written by hand (no SDK macros) to keep compile time low.
//! Tools: `echo` (returns `echo: <message>`) and `pid` (returns the process
//! id, so tests can tell which pooled process served a call).

use std::sync::Arc;

use rmcp3 as rmcp;

use rmcp::model::{
    object, CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::json;

/// The fixture's `ServerHandler`: one `echo` tool and one `pid` tool.
struct Fixture;

impl ServerHandler for Fixture {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_server_info(
            Implementation::new("rmcp3-fixture", env!("CARGO_PKG_VERSION")),
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
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
        Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into())
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
