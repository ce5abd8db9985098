//! The wgpu backend (placeholder while the kernels are written).

use std::sync::Arc;

use super::{Backend, BackendInfo};
use crate::error::{InferenceError, Result};
use crate::model::BertWeights;

/// The wgpu engine.
#[derive(Debug)]
pub struct WgpuBackend;

impl WgpuBackend {
    /// Opens a device.
    pub fn new(_adapter: Option<&str>, _hardware_only: bool) -> Result<Self> {
        Err(InferenceError::Gpu("not built yet".into()))
    }
}

impl Backend for WgpuBackend {
    fn info(&self) -> BackendInfo {
        unreachable!()
    }
    fn upload(&mut self, _weights: Arc<BertWeights>) -> Result<()> {
        Ok(())
    }
    fn embed(&self, _batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(vec![])
    }
    fn matmul(&self, _a: &[f32], _b: &[f32], _m: usize, _k: usize, _n: usize) -> Result<Vec<f32>> {
        Ok(vec![])
    }
}
