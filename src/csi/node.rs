//! The CSI Node service: publish gives a pod its socket, unpublish takes it
//! away. Stage, stats and expand are not offered (UNIMPLEMENTED; the
//! capabilities list is empty, so a CO never calls them).
//!
//! Invariants: publishes and unpublishes run one at a time, and the state
//! file is saved before a publish answers OK, so what a restarted broker
//! restores is exactly what the kubelet was told is published. Error codes
//! follow the CSI spec: missing or malformed arguments are
//! INVALID_ARGUMENT; a second publish of a volume at its target path is OK
//! when its other arguments match and ALREADY_EXISTS when not, at another
//! target path FAILED_PRECONDITION (single-node access modes); unpublish is
//! OK when nothing of that volume is left at the path (so a repeat is OK),
//! and NOT_FOUND when the path belongs to another volume id.

use super::proto::node_server::Node;
use super::proto::*;
use super::registry::Registry;
use super::state::State;
use super::volume::Volume;
use crate::broker::Broker;
use std::path::Path;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Most volumes one node serves (`NodeGetInfo.max_volumes_per_node`).
pub const MAX_VOLUMES: usize = 1024;

/// The Node service over the registry and the state file.
pub struct NodeService {
    pub broker: Arc<Broker>,
    pub registry: Arc<Registry>,
    pub state: Arc<State>,
    pub node_id: String,
    /// One publish or unpublish at a time (they read, change and save).
    pub ops: Arc<tokio::sync::Mutex<()>>,
}

impl NodeService {
    fn save(&self) -> Result<(), Status> {
        self.state.save(self.registry.volumes()).map_err(|e| {
            tracing::error!("saving CSI state: {e}");
            Status::internal(format!("saving the plugin state: {e}"))
        })
    }

    async fn publish(&self, r: NodePublishVolumeRequest) -> Result<(), Status> {
        let v = Volume::from_request(&r, |p| self.broker.pool(p).is_some())
            .map_err(Status::invalid_argument)?;
        let _one = self.ops.lock().await;
        if let Some(have) = self.registry.get(&v.volume_id) {
            return match (have.target_path == v.target_path, have.same_arguments(&v)) {
                (true, true) => Ok(()),
                (true, false) => Err(Status::already_exists(format!(
                    "volume {} is published at {} with other arguments",
                    v.volume_id,
                    v.target_path.display()
                ))),
                (false, _) => Err(Status::failed_precondition(format!(
                    "volume {} is already published at {} (single-node access)",
                    v.volume_id,
                    have.target_path.display()
                ))),
            };
        }
        if let Some(other) = self.registry.at_target(&v.target_path) {
            return Err(Status::already_exists(format!(
                "target path {} already holds volume {other}",
                v.target_path.display()
            )));
        }
        if self.registry.len() >= MAX_VOLUMES {
            return Err(Status::resource_exhausted(format!(
                "this node serves {MAX_VOLUMES} volumes already"
            )));
        }
        let started = std::time::Instant::now();
        let id = v.volume_id.clone();
        let target = v.target_path.clone();
        if let Err(e) = self.registry.open(v) {
            // Nothing is served there (no volume holds the path): leave
            // nothing behind for the kubelet's retry.
            super::registry::remove_socket_dir(&target);
            return Err(Status::internal(format!(
                "creating the pod socket in {}: {e}",
                r.target_path
            )));
        }
        if let Err(e) = self.save() {
            self.registry.close(&id).await;
            return Err(e);
        }
        tracing::info!(
            volume = id,
            elapsed_us = started.elapsed().as_micros() as u64,
            "NodePublishVolume: socket listening"
        );
        Ok(())
    }

    async fn unpublish(&self, r: NodeUnpublishVolumeRequest) -> Result<(), Status> {
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if r.target_path.is_empty() {
            return Err(Status::invalid_argument("target_path is required"));
        }
        let target = Path::new(&r.target_path);
        let _one = self.ops.lock().await;
        match self.registry.get(&r.volume_id) {
            Some(v) if v.target_path == target => {
                self.registry.close(&r.volume_id).await;
                self.save()
            }
            _ => match self.registry.at_target(target) {
                Some(other) => Err(Status::not_found(format!(
                    "volume {} does not exist at {} (volume {other} is published there)",
                    r.volume_id, r.target_path
                ))),
                // Already unpublished (or never published): nothing of it
                // is served; remove what a crash may have left. OK.
                None => {
                    super::registry::remove_socket_dir(target);
                    Ok(())
                }
            },
        }
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        _: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeStageVolume"))
    }

    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeUnstageVolume"))
    }

    async fn node_publish_volume(
        &self,
        r: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        self.publish(r.into_inner()).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        self.unpublish(r.into_inner()).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        _: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented("NodeGetVolumeStats"))
    }

    async fn node_expand_volume(
        &self,
        _: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeExpandVolume"))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: MAX_VOLUMES as i64,
            accessible_topology: None,
        }))
    }
}
