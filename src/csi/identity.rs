//! The CSI Identity service: the driver's name and version, no optional
//! capabilities (a node-only plugin: no controller service), and readiness.

use super::proto::identity_server::Identity;
use super::proto::*;
use crate::broker::Broker;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Answers who the plugin is and whether it is ready.
pub struct IdentityService {
    pub broker: Arc<Broker>,
    pub driver_name: String,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        // Publishing works as soon as the broker runs (pools may still be
        // warming; leases then wait); not while it shuts down.
        Ok(Response::new(ProbeResponse {
            ready: Some(!self.broker.is_draining()),
        }))
    }
}
