//! The wgpu backend: the encoder as WGSL compute kernels.
//!
//! Owns a wgpu device on an explicitly requested native backend (Vulkan,
//! Metal or DX12; never the GL fallback), the kernels in `shaders/`, the
//! model's weights (uploaded once, linear weights `[in, out]` with rows padded
//! to whole vec4s) and a pooled workspace of activation buffers and bind
//! groups that is reused across requests and only grows. A forward pass is
//! one command encoder, one compute pass and one readback.
//!
//! wgpu reports validation errors through a callback that panics by default;
//! this backend installs its own handler and turns them into
//! [`InferenceError::Gpu`], and sizes every buffer within the device limits
//! up front, so no input reaches a wgpu panic.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use wgpu::util::DeviceExt;

use super::{Backend, BackendInfo, check_batch, check_embedding_lookup, check_weights};
use crate::error::{InferenceError, Result};
use crate::model::BertWeights;

/// Most padded tokens (`batch × longest sequence`) run in one forward pass;
/// larger batches are split. Keeps every dispatch within 65 535 workgroups
/// per dimension and the feed-forward buffer well under common binding limits.
pub const MAX_PASS_TOKENS: usize = 16 * 1024;

/// Bytes of one kernel's parameter block (eight u32, see the shaders).
const PARAMS_BYTES: u64 = 32;
/// Parameter slots per forward pass (45 dispatches for a 6-layer model).
const MAX_DISPATCHES_PER_PASS: usize = 256;

type Params = [u32; 8];

struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

impl Kernel {
    /// Binding 0 is the uniform parameter block (dynamic offset), then
    /// `reads` read-only storage buffers, then one read-write output.
    fn new(device: &wgpu::Device, label: &str, src: &str, reads: u32) -> Self {
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                min_binding_size: wgpu::BufferSize::new(PARAMS_BYTES),
            },
            count: None,
        }];
        for i in 0..=reads {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: i + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: i < reads },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(label),
            entries: &entries,
        });
        let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: Some(&pl),
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        Self { pipeline, layout }
    }
}

struct Kernels {
    matmul: Kernel,
    layernorm: Kernel,
    embed: Kernel,
    /// Attention kernels by head size, built on first use.
    attention: Mutex<HashMap<usize, Arc<Kernel>>>,
    pool: Kernel,
}

struct GpuLayer {
    qkv_w: wgpu::Buffer,
    qkv_b: wgpu::Buffer,
    o_w: wgpu::Buffer,
    o_b: wgpu::Buffer,
    ln1_g: wgpu::Buffer,
    ln1_b: wgpu::Buffer,
    ff_in_w: wgpu::Buffer,
    ff_in_b: wgpu::Buffer,
    ff_out_w: wgpu::Buffer,
    ff_out_b: wgpu::Buffer,
    ln2_g: wgpu::Buffer,
    ln2_b: wgpu::Buffer,
}

struct GpuModel {
    weights: Arc<BertWeights>,
    word: wgpu::Buffer,
    pos: wgpu::Buffer,
    typ: wgpu::Buffer,
    emb_ln_g: wgpu::Buffer,
    emb_ln_b: wgpu::Buffer,
    layers: Vec<GpuLayer>,
}

/// Bind groups of one layer, in dispatch order.
struct LayerGroups {
    qkv: wgpu::BindGroup,
    attention: wgpu::BindGroup,
    attn_out: wgpu::BindGroup,
    ln1: wgpu::BindGroup,
    ff_in: wgpu::BindGroup,
    ff_out: wgpu::BindGroup,
    ln2: wgpu::BindGroup,
}

/// Pooled activation buffers sized for `tokens` padded tokens and `batch`
/// sequences, with the bind groups that reference them.
struct Workspace {
    tokens: usize,
    batch: usize,
    ids: wgpu::Buffer,
    mask: wgpu::Buffer,
    out: wgpu::Buffer,
    staging: wgpu::Buffer,
    params: wgpu::Buffer,
    embed: wgpu::BindGroup,
    emb_ln: wgpu::BindGroup,
    layers: Vec<LayerGroups>,
    pool: wgpu::BindGroup,
}

/// The wgpu engine.
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: BackendInfo,
    kernels: Kernels,
    tile: MatmulTile,
    uniform_align: u64,
    max_binding: u64,
    errors: Arc<Mutex<Vec<String>>>,
    model: Option<GpuModel>,
    workspace: Mutex<Option<Workspace>>,
}

impl std::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("info", &self.info)
            .field("loaded", &self.model.is_some())
            .finish_non_exhaustive()
    }
}

/// The native graphics APIs this backend accepts.
fn native_backends() -> wgpu::Backends {
    wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12
}

fn device_type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete-gpu",
        wgpu::DeviceType::IntegratedGpu => "integrated-gpu",
        wgpu::DeviceType::VirtualGpu => "virtual-gpu",
        wgpu::DeviceType::Cpu => "cpu",
        wgpu::DeviceType::Other => "other",
    }
}

fn device_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// Adapters wgpu finds on the native APIs, as `(name, device type, api)`.
pub fn list_adapters() -> Vec<(String, String, String)> {
    let instance = new_instance();
    pollster::block_on(instance.enumerate_adapters(native_backends()))
        .iter()
        .map(|a| {
            let i = a.get_info();
            (
                i.name,
                device_type_name(i.device_type).to_string(),
                i.backend.to_string().to_lowercase(),
            )
        })
        .collect()
}

fn new_instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = native_backends();
    wgpu::Instance::new(desc)
}

fn gpu_err(e: impl std::fmt::Display) -> InferenceError {
    InferenceError::Gpu(e.to_string())
}

/// Pads each row of a `[k, n]` matrix to a whole number of vec4s.
fn pad_cols(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let n4 = n.div_ceil(4) * 4;
    if n4 == n {
        return w.to_vec();
    }
    let mut out = vec![0.0; k * n4];
    for r in 0..k {
        out[r * n4..r * n4 + n].copy_from_slice(&w[r * n..(r + 1) * n]);
    }
    out
}

impl WgpuBackend {
    /// Opens a device. `adapter` picks by case-insensitive name substring;
    /// `hardware_only` accepts only discrete or integrated GPUs (for `auto`).
    /// Only Vulkan, Metal and DX12 adapters are considered.
    pub fn new(adapter: Option<&str>, hardware_only: bool) -> Result<Self> {
        let instance = new_instance();
        let mut adapters = pollster::block_on(instance.enumerate_adapters(native_backends()));
        let found: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        adapters.retain(|a| {
            let i = a.get_info();
            let name_ok = adapter.is_none_or(|want| i.name.to_lowercase().contains(&want.to_lowercase()));
            let type_ok = !hardware_only
                || matches!(
                    i.device_type,
                    wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu
                );
            name_ok && type_ok && native_backends().contains(i.backend.into())
        });
        adapters.sort_by_key(|a| device_rank(a.get_info().device_type));
        let Some(adapter) = adapters.into_iter().next() else {
            return Err(InferenceError::Gpu(format!(
                "no suitable {}adapter{} on Vulkan/Metal/DX12; adapters found: [{}]",
                if hardware_only { "hardware GPU " } else { "" },
                adapter.map(|a| format!(" matching {a:?}")).unwrap_or_default(),
                found.join(", ")
            )));
        };
        let ainfo = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("cell0-inference"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| InferenceError::Gpu(format!("cannot open device on {}: {e}", ainfo.name)))?;
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::error!(error = %e, "wgpu error");
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let tile = if ainfo.device_type == wgpu::DeviceType::Cpu {
            MatmulTile::CPU_ADAPTER
        } else {
            MatmulTile::GPU
        };
        let kernels = Kernels {
            matmul: Kernel::new(&device, "matmul", &matmul_source(tile), 3),
            layernorm: Kernel::new(&device, "layernorm", include_str!("shaders/layernorm.wgsl"), 3),
            embed: Kernel::new(&device, "embed", include_str!("shaders/embed.wgsl"), 4),
            attention: Mutex::new(HashMap::new()),
            pool: Kernel::new(&device, "pool", include_str!("shaders/pool.wgsl"), 2),
        };
        let info = BackendInfo {
            backend: "wgpu".into(),
            adapter: ainfo.name.clone(),
            driver: format!("{} {}", ainfo.driver, ainfo.driver_info).trim().to_string(),
            device_type: device_type_name(ainfo.device_type).into(),
            api: ainfo.backend.to_string().to_lowercase(),
            limits: vec![
                ("max_buffer_size".into(), limits.max_buffer_size),
                (
                    "max_storage_buffer_binding_size".into(),
                    limits.max_storage_buffer_binding_size,
                ),
                (
                    "max_compute_workgroup_storage_size".into(),
                    limits.max_compute_workgroup_storage_size.into(),
                ),
                (
                    "max_compute_invocations_per_workgroup".into(),
                    limits.max_compute_invocations_per_workgroup.into(),
                ),
                (
                    "max_compute_workgroups_per_dimension".into(),
                    limits.max_compute_workgroups_per_dimension.into(),
                ),
            ],
        };
        let backend = Self {
            device,
            queue,
            info,
            kernels,
            tile,
            uniform_align: u64::from(limits.min_uniform_buffer_offset_alignment).max(PARAMS_BYTES),
            max_binding: (limits.max_storage_buffer_binding_size).min(limits.max_buffer_size),
            errors,
            model: None,
            workspace: Mutex::new(None),
        };
        backend.take_errors()?;
        Ok(backend)
    }

    /// The attention kernel for `head_dim`, compiled once per size.
    fn attention_kernel(&self, head_dim: usize) -> Result<Arc<Kernel>> {
        check_head_dim(head_dim)?;
        let mut cache = self
            .kernels
            .attention
            .lock()
            .map_err(|_| gpu_err("kernel cache poisoned"))?;
        let k = cache
            .entry(head_dim)
            .or_insert_with(|| Arc::new(Kernel::new(&self.device, "attention", &attention_source(head_dim), 2)));
        Ok(k.clone())
    }

    /// The wgpu API in use (`vulkan`, `metal`, `dx12`).
    pub fn api(&self) -> &str {
        &self.info.api
    }

    fn take_errors(&self) -> Result<()> {
        let mut v = self.errors.lock().map_err(|_| gpu_err("error log poisoned"))?;
        if v.is_empty() {
            Ok(())
        } else {
            let msg = v.join("; ");
            v.clear();
            Err(InferenceError::Gpu(msg))
        }
    }

    fn storage(&self, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
        let size = bytes.len() as u64;
        if size > self.max_binding {
            return Err(InferenceError::Gpu(format!(
                "{label}: {size} bytes exceeds the device's storage binding limit of {}",
                self.max_binding
            )));
        }
        // Zero-sized bindings are invalid; a 16-byte placeholder is never read.
        let zero = [0u8; 16];
        let contents = if bytes.is_empty() { &zero[..] } else { bytes };
        Ok(self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        }))
    }

    fn f32_buf(&self, label: &str, v: &[f32]) -> Result<wgpu::Buffer> {
        self.storage(label, bytemuck::cast_slice(v))
    }

    fn empty(&self, label: &str, floats: usize) -> Result<wgpu::Buffer> {
        let size = (floats.max(4) * 4) as u64;
        if size > self.max_binding {
            return Err(InferenceError::Gpu(format!(
                "{label}: {size} bytes exceeds the device's storage binding limit of {}",
                self.max_binding
            )));
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        }))
    }

    fn params_buffer(&self, slots: usize) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: self.uniform_align * slots as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    fn staging(&self, floats: usize) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: (floats.max(4) * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    fn bind(&self, kernel: &Kernel, params: &wgpu::Buffer, bufs: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: params,
                offset: 0,
                size: wgpu::BufferSize::new(PARAMS_BYTES),
            }),
        }];
        for (i, b) in bufs.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.as_entire_binding(),
            });
        }
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &kernel.layout,
            entries: &entries,
        })
    }

    /// Copies `src` (`floats` long) into a staging buffer, submits `encoder`
    /// and waits for the result: the pass's single readback.
    fn submit_and_read(
        &self,
        mut encoder: wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        staging: &wgpu::Buffer,
        floats: usize,
    ) -> Result<Vec<f32>> {
        let bytes = (floats * 4) as u64;
        encoder.copy_buffer_to_buffer(src, 0, staging, 0, bytes);
        self.queue.submit([encoder.finish()]);
        let slice = staging.slice(..bytes);
        let (tx, rx) = mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            // The receiver outlives the poll below; a send failure means the
            // caller already returned an error, so the result is moot.
            let _ = tx.send(r);
        });
        let polled = self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(gpu_err);
        // Read and unmap whenever the mapping succeeded, even if an error is
        // reported below, so the pooled staging buffer stays usable.
        // try_recv: after a failed poll the callback may never run, and a
        // blocking recv would then hang.
        let mapped = rx
            .try_recv()
            .map_err(|_| gpu_err("readback did not complete"))
            .and_then(|r| r.map_err(|e| gpu_err(format!("readback failed: {e}"))));
        let out = match mapped {
            Ok(()) => {
                let read = slice
                    .get_mapped_range()
                    .map(|view| bytemuck::cast_slice::<u8, f32>(&view).to_vec())
                    .map_err(gpu_err);
                staging.unmap();
                read
            }
            Err(e) => Err(e),
        };
        polled?;
        self.take_errors()?;
        out
    }

    /// Runs one kernel once on fresh buffers; for the kernel tests and the matmul bench.
    fn run_once(
        &self,
        kernel: &Kernel,
        params: Params,
        inputs: &[wgpu::Buffer],
        out_floats: usize,
        groups: (u32, u32),
    ) -> Result<Vec<f32>> {
        let out = self.empty("out", out_floats)?;
        let staging = self.staging(out_floats);
        let pbuf = self.params_buffer(1);
        self.queue.write_buffer(&pbuf, 0, bytemuck::cast_slice(&params));
        let mut bufs: Vec<&wgpu::Buffer> = inputs.iter().collect();
        bufs.push(&out);
        let bg = self.bind(kernel, &pbuf, &bufs);
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&kernel.pipeline);
            pass.set_bind_group(0, &bg, &[0]);
            pass.dispatch_workgroups(groups.0, groups.1, 1);
        }
        let mut v = self.submit_and_read(enc, &out, &staging, out_floats)?;
        v.truncate(out_floats);
        Ok(v)
    }

    /// The matmul register block this device uses.
    pub fn matmul_tile(&self) -> MatmulTile {
        self.tile
    }

    /// Kernel test entry: `a[m,k] · w[k,n] + bias`, then GELU when `gelu`.
    #[allow(clippy::too_many_arguments)]
    pub fn kernel_matmul(
        &self,
        a: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        gelu: bool,
    ) -> Result<Vec<f32>> {
        self.matmul_on(&self.kernels.matmul, self.tile, a, w, bias, (m, k, n), gelu)
    }

    /// Kernel test entry: like [`WgpuBackend::kernel_matmul`] with another
    /// register block, so every tile shape can be checked on any adapter.
    #[allow(clippy::too_many_arguments)]
    pub fn kernel_matmul_with_tile(
        &self,
        tile: MatmulTile,
        a: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        gelu: bool,
    ) -> Result<Vec<f32>> {
        if tile.rows == 0 || tile.cols4 == 0 || tile.wg_x == 0 || tile.wg_y == 0 || tile.wg_x * tile.wg_y > 256 {
            return Err(InferenceError::Backend(format!("unsupported matmul tile {tile:?}")));
        }
        let kernel = Kernel::new(&self.device, "matmul-test", &matmul_source(tile), 3);
        self.matmul_on(&kernel, tile, a, w, bias, (m, k, n), gelu)
    }

    #[allow(clippy::too_many_arguments)]
    fn matmul_on(
        &self,
        kernel: &Kernel,
        tile: MatmulTile,
        a: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        (m, k, n): (usize, usize, usize),
        gelu: bool,
    ) -> Result<Vec<f32>> {
        if a.len() != m * k || w.len() != k * n || bias.is_some_and(|b| b.len() != n) {
            return Err(InferenceError::Backend(
                "matmul: slice lengths do not match m, k, n".into(),
            ));
        }
        if m == 0 || n == 0 {
            return Ok(Vec::new());
        }
        // The kernel reads A as vec4 along k: pad k with zero columns of A
        // and zero rows of W, which leaves the product unchanged.
        let kp = k.div_ceil(4) * 4;
        let mut wp = w.to_vec();
        wp.resize(kp * n, 0.0);
        let zeros = vec![0.0; n];
        let bias = pad_cols(bias.unwrap_or(&zeros), 1, n);
        let inputs = [
            self.f32_buf("a", &pad_cols(a, m, k))?,
            self.f32_buf("w", &pad_cols(&wp, kp, n))?,
            self.f32_buf("bias", &bias)?,
        ];
        let groups = tile.groups(m, n)?;
        self.run_once(
            kernel,
            [m as u32, n as u32, kp as u32, gelu as u32, 0, 0, 0, 0],
            &inputs,
            m * n,
            groups,
        )
    }

    /// Kernel test entry: row-wise `LayerNorm(x + residual)`.
    pub fn kernel_layer_norm(
        &self,
        x: &[f32],
        residual: Option<&[f32]>,
        g: &[f32],
        b: &[f32],
        cols: usize,
        eps: f32,
    ) -> Result<Vec<f32>> {
        if cols == 0 || !x.len().is_multiple_of(cols) || g.len() != cols || b.len() != cols {
            return Err(InferenceError::Backend("layer_norm: bad shapes".into()));
        }
        let rows = x.len() / cols;
        // The kernel's output buffer starts zeroed, so x (+ residual) goes in
        // as the residual: 0 + (x + r) is what the model's dispatch sees.
        let inputs = [
            self.f32_buf("residual", &add_opt(x, residual))?,
            self.f32_buf("g", g)?,
            self.f32_buf("b", b)?,
        ];
        let (gx, gy, per) = row_groups(rows)?;
        self.run_once(
            &self.kernels.layernorm,
            [rows as u32, cols as u32, eps.to_bits(), 1, per, 0, 0, 0],
            &inputs,
            rows * cols,
            (gx, gy),
        )
    }

    /// Kernel test entry: word + position + type-0 embeddings of a padded `[batch, seq]` id grid.
    pub fn kernel_embed(
        &self,
        word: &[f32],
        pos: &[f32],
        typ: &[f32],
        ids: &[u32],
        seq: usize,
        hidden: usize,
    ) -> Result<Vec<f32>> {
        // The shader reads word[id * hidden ..]: ids are checked here, before upload.
        check_embedding_lookup(word, pos, typ, ids, seq, hidden)?;
        let inputs = [
            self.storage("ids", bytemuck::cast_slice(ids))?,
            self.f32_buf("word", word)?,
            self.f32_buf("pos", pos)?,
            self.f32_buf("type", typ)?,
        ];
        let (gx, gy, per) = row_groups(ids.len())?;
        self.run_once(
            &self.kernels.embed,
            [ids.len() as u32, seq as u32, hidden as u32, per, 0, 0, 0, 0],
            &inputs,
            ids.len() * hidden,
            (gx, gy),
        )
    }

    /// Kernel test entry: masked multi-head attention on a padded layout
    /// (`qkv` is `[batch*seq, 3*heads*head_dim]`).
    pub fn kernel_attention(
        &self,
        qkv: &[f32],
        mask: &[u32],
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Vec<f32>> {
        let hidden = heads * head_dim;
        check_head_dim(head_dim)?;
        if qkv.len() != batch * seq * 3 * hidden || mask.len() != batch * seq {
            return Err(InferenceError::Backend("attention: bad shapes".into()));
        }
        let inputs = [
            self.f32_buf("qkv", qkv)?,
            self.storage("mask", bytemuck::cast_slice(mask))?,
        ];
        let groups = attention_groups(batch * heads * seq)?;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let kernel = self.attention_kernel(head_dim)?;
        self.run_once(
            &kernel,
            [
                batch as u32,
                seq as u32,
                heads as u32,
                head_dim as u32,
                hidden as u32,
                scale.to_bits(),
                0,
                0,
            ],
            &inputs,
            batch * seq * hidden,
            groups,
        )
    }

    /// Kernel test entry: masked mean pooling then L2 normalization.
    pub fn kernel_mean_pool_normalize(
        &self,
        x: &[f32],
        mask: &[u32],
        batch: usize,
        seq: usize,
        hidden: usize,
    ) -> Result<Vec<f32>> {
        if x.len() != batch * seq * hidden || mask.len() != batch * seq || batch > 65_535 {
            return Err(InferenceError::Backend("pool: bad shapes".into()));
        }
        let inputs = [self.f32_buf("x", x)?, self.storage("mask", bytemuck::cast_slice(mask))?];
        self.run_once(
            &self.kernels.pool,
            [batch as u32, seq as u32, hidden as u32, 0, 0, 0, 0, 0],
            &inputs,
            batch * hidden,
            (batch as u32, 1),
        )
    }

    fn workspace<'a>(
        &self,
        guard: &'a mut MutexGuard<'_, Option<Workspace>>,
        model: &GpuModel,
        tokens: usize,
        batch: usize,
    ) -> Result<&'a Workspace> {
        let fits = guard.as_ref().is_some_and(|w| w.tokens >= tokens && w.batch >= batch);
        if !fits {
            let tokens = tokens.next_power_of_two().max(256);
            let batch = batch.next_power_of_two().max(8);
            **guard = Some(self.new_workspace(model, tokens, batch)?);
        }
        guard
            .as_ref()
            .ok_or_else(|| gpu_err("workspace missing after allocation"))
    }

    fn new_workspace(&self, m: &GpuModel, tokens: usize, batch: usize) -> Result<Workspace> {
        let c = &m.weights.config;
        let h = c.hidden_size;
        let attention = self.attention_kernel(c.head_dim())?;
        let ids = self.empty("ids", tokens)?;
        let mask = self.empty("mask", tokens)?;
        let x = self.empty("x", tokens * h)?;
        let qkv = self.empty("qkv", tokens * 3 * h)?;
        let ctx = self.empty("ctx", tokens * h)?;
        let tmp = self.empty("tmp", tokens * h)?;
        let ff = self.empty("ff", tokens * c.intermediate_size)?;
        let out = self.empty("pooled", batch * h)?;
        let dummy = self.empty("no-residual", 4)?;
        let staging = self.staging(batch * h);
        let params = self.params_buffer(MAX_DISPATCHES_PER_PASS);
        let k = &self.kernels;
        let layers = m
            .layers
            .iter()
            .map(|l| LayerGroups {
                qkv: self.bind(&k.matmul, &params, &[&x, &l.qkv_w, &l.qkv_b, &qkv]),
                attention: self.bind(&attention, &params, &[&qkv, &mask, &ctx]),
                attn_out: self.bind(&k.matmul, &params, &[&ctx, &l.o_w, &l.o_b, &tmp]),
                ln1: self.bind(&k.layernorm, &params, &[&tmp, &l.ln1_g, &l.ln1_b, &x]),
                ff_in: self.bind(&k.matmul, &params, &[&x, &l.ff_in_w, &l.ff_in_b, &ff]),
                ff_out: self.bind(&k.matmul, &params, &[&ff, &l.ff_out_w, &l.ff_out_b, &tmp]),
                ln2: self.bind(&k.layernorm, &params, &[&tmp, &l.ln2_g, &l.ln2_b, &x]),
            })
            .collect();
        Ok(Workspace {
            tokens,
            batch,
            embed: self.bind(&k.embed, &params, &[&ids, &m.word, &m.pos, &m.typ, &x]),
            emb_ln: self.bind(&k.layernorm, &params, &[&dummy, &m.emb_ln_g, &m.emb_ln_b, &x]),
            layers,
            pool: self.bind(&k.pool, &params, &[&x, &mask, &out]),
            ids,
            mask,
            out,
            staging,
            params,
        })
    }

    /// One forward pass over a batch that fits [`MAX_PASS_TOKENS`].
    fn forward(&self, m: &GpuModel, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let c = &m.weights.config;
        let (h, inter, heads, hd) = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.head_dim());
        let b = batch.len();
        let seq = batch.iter().map(Vec::len).max().unwrap_or(0);
        let tokens = b * seq;
        let mut ids = vec![0u32; tokens];
        let mut mask = vec![0u32; tokens];
        for (i, s) in batch.iter().enumerate() {
            ids[i * seq..i * seq + s.len()].copy_from_slice(s);
            mask[i * seq..i * seq + s.len()].fill(1);
        }
        let mut guard = self.workspace.lock().map_err(|_| gpu_err("workspace lock poisoned"))?;
        let ws = self.workspace(&mut guard, m, tokens, b)?;
        self.queue.write_buffer(&ws.ids, 0, bytemuck::cast_slice(&ids));
        self.queue.write_buffer(&ws.mask, 0, bytemuck::cast_slice(&mask));

        let (t, s, hh) = (tokens as u32, seq as u32, h as u32);
        let eps = c.layer_norm_eps.to_bits();
        let (rgx, rgy, per) = row_groups(tokens)?;
        let mm = |n: usize, k: usize, gelu: bool| -> Result<(Params, (u32, u32))> {
            Ok((
                [t, n as u32, k as u32, gelu as u32, 0, 0, 0, 0],
                self.tile.groups(tokens, n)?,
            ))
        };
        let ln: Params = [t, hh, eps, 1, per, 0, 0, 0];
        let attn: Params = [
            b as u32,
            s,
            heads as u32,
            hd as u32,
            hh,
            (1.0 / (hd as f32).sqrt()).to_bits(),
            0,
            0,
        ];
        let attn_groups = attention_groups(b * heads * seq)?;
        let (p_qkv, g_qkv) = mm(3 * h, h, false)?;
        let (p_o, g_o) = mm(h, h, false)?;
        let (p_ff1, g_ff1) = mm(inter, h, true)?;
        let (p_ff2, g_ff2) = mm(h, inter, false)?;

        let k = &self.kernels;
        let attention = self.attention_kernel(hd)?;
        let mut steps: Vec<(&Kernel, &wgpu::BindGroup, Params, (u32, u32))> = vec![
            (&k.embed, &ws.embed, [t, s, hh, per, 0, 0, 0, 0], (rgx, rgy)),
            (&k.layernorm, &ws.emb_ln, [t, hh, eps, 0, per, 0, 0, 0], (rgx, rgy)),
        ];
        for lg in &ws.layers {
            steps.push((&k.matmul, &lg.qkv, p_qkv, g_qkv));
            steps.push((&attention, &lg.attention, attn, attn_groups));
            steps.push((&k.matmul, &lg.attn_out, p_o, g_o));
            steps.push((&k.layernorm, &lg.ln1, ln, (rgx, rgy)));
            steps.push((&k.matmul, &lg.ff_in, p_ff1, g_ff1));
            steps.push((&k.matmul, &lg.ff_out, p_ff2, g_ff2));
            steps.push((&k.layernorm, &lg.ln2, ln, (rgx, rgy)));
        }
        steps.push((&k.pool, &ws.pool, [b as u32, s, hh, 0, 0, 0, 0, 0], (b as u32, 1)));
        if steps.len() > MAX_DISPATCHES_PER_PASS {
            return Err(gpu_err(format!("model needs {} dispatches per pass", steps.len())));
        }

        let align = self.uniform_align as usize;
        let mut pbytes = vec![0u8; steps.len() * align];
        for (i, st) in steps.iter().enumerate() {
            pbytes[i * align..i * align + PARAMS_BYTES as usize].copy_from_slice(bytemuck::cast_slice(&st.2));
        }
        self.queue.write_buffer(&ws.params, 0, &pbytes);

        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("forward") });
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for (i, (kernel, bg, _, (gx, gy))) in steps.iter().enumerate() {
                pass.set_pipeline(&kernel.pipeline);
                pass.set_bind_group(0, *bg, &[(i * align) as u32]);
                pass.dispatch_workgroups(*gx, *gy, 1);
            }
        }
        let flat = self.submit_and_read(enc, &ws.out, &ws.staging, b * h)?;
        Ok(flat.chunks_exact(h).map(<[f32]>::to_vec).collect())
    }
}

fn add_opt(x: &[f32], r: Option<&[f32]>) -> Vec<f32> {
    match r {
        Some(r) => x.iter().zip(r).map(|(a, b)| a + b).collect(),
        None => x.to_vec(),
    }
}

fn check_head_dim(hd: usize) -> Result<()> {
    if hd == 0 || !hd.is_multiple_of(4) || hd > 64 {
        return Err(InferenceError::Backend(format!(
            "attention head size {hd} unsupported by the wgpu kernel (needs a multiple of 4, at most 64)"
        )));
    }
    Ok(())
}

const MAX_GROUPS: usize = 65_535;

/// Register block and workgroup shape of the generated matmul kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulTile {
    /// Rows of C per invocation.
    pub rows: usize,
    /// vec4 columns of C per invocation.
    pub cols4: usize,
    /// Workgroup width (along n).
    pub wg_x: usize,
    /// Workgroup height (along m).
    pub wg_y: usize,
}

impl MatmulTile {
    /// For GPUs: a 4×8 block per invocation keeps accumulators in registers.
    pub const GPU: Self = Self {
        rows: 4,
        cols4: 2,
        wg_x: 8,
        wg_y: 8,
    };
    /// For CPU adapters (lavapipe): large blocks amortize the per-invocation
    /// overhead of SIMD-across-invocations execution; measured fastest of the
    /// shapes tried (see docs/inference.md).
    pub const CPU_ADAPTER: Self = Self {
        rows: 16,
        cols4: 8,
        wg_x: 8,
        wg_y: 8,
    };

    fn groups(&self, m: usize, n: usize) -> Result<(u32, u32)> {
        matmul_groups(m, n, *self)
    }
}

/// The matmul kernel for `t`: the shared prelude of `shaders/matmul.wgsl`
/// plus a fully unrolled `main`, so every accumulator is a named local the
/// shader compiler keeps in registers.
pub fn matmul_source(t: MatmulTile) -> String {
    use std::fmt::Write;
    let (r, c) = (t.rows, t.cols4);
    let mut s = String::from(include_str!("shaders/matmul.wgsl"));
    // Writing to a String cannot fail.
    let mut w = |line: String| {
        let _ = writeln!(s, "{line}");
    };
    w(format!("@compute @workgroup_size({}, {}, 1)", t.wg_x, t.wg_y));
    w("fn main(@builtin(global_invocation_id) gid: vec3<u32>) {".into());
    w("    let n4 = (p.n + 3u) / 4u;".into());
    w("    let k4 = p.k / 4u;".into());
    w(format!("    let c4_0 = gid.x * {c}u;"));
    w(format!("    let r0 = gid.y * {r}u;"));
    w("    if (r0 >= p.m || c4_0 >= n4) {\n        return;\n    }".into());
    w("    let last = p.m - 1u;".into());
    for j in 0..c {
        w(format!("    let cw{j} = min(c4_0 + {j}u, n4 - 1u);"));
    }
    for i in 0..r {
        w(format!("    let ra{i} = min(r0 + {i}u, last) * k4;"));
    }
    for i in 0..r {
        for j in 0..c {
            w(format!("    var acc{i}_{j} = vec4<f32>(0.0);"));
        }
    }
    w("    for (var kq = 0u; kq < k4; kq++) {".into());
    for i in 0..r {
        w(format!("        let a{i} = a[ra{i} + kq];"));
    }
    w("        let wr = kq * 4u * n4;".into());
    for d in 0..4 {
        for j in 0..c {
            w(format!("        let w{d}_{j} = w[wr + {d}u * n4 + cw{j}];"));
        }
    }
    for i in 0..r {
        for j in 0..c {
            w(format!(
                "        acc{i}_{j} += a{i}.x * w0_{j} + a{i}.y * w1_{j} + a{i}.z * w2_{j} + a{i}.w * w3_{j};"
            ));
        }
    }
    w("    }".into());
    for i in 0..r {
        for j in 0..c {
            w(format!("    store_row(r0 + {i}u, c4_0 + {j}u, acc{i}_{j});"));
        }
    }
    w("}".into());
    s
}

/// The attention kernel for heads of `head_dim` floats: the prelude of
/// `shaders/attention.wgsl` plus a `main` unrolled over the head's vec4s, so
/// the query and the running output stay in named registers instead of an
/// indexed (memory-backed) array.
pub fn attention_source(head_dim: usize) -> String {
    use std::fmt::Write;
    let d4 = head_dim / 4;
    let mut s = String::from(include_str!("shaders/attention.wgsl"));
    // Writing to a String cannot fail.
    let mut w = |line: String| {
        let _ = writeln!(s, "{line}");
    };
    w("@compute @workgroup_size(64, 1, 1)".into());
    w("fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {".into());
    w("    let idx = gid.x + gid.y * nwg.x * 64u;".into());
    w("    if (idx >= p.batch * p.heads * p.seq) {\n        return;\n    }".into());
    w("    let i = idx % p.seq;".into());
    w("    let bh = idx / p.seq;".into());
    w("    let h = bh % p.heads;".into());
    w("    let b = bh / p.heads;".into());
    w("    let hid4 = p.hidden / 4u;".into());
    w("    let row4 = 3u * hid4;".into());
    w(format!("    let out_base = (b * p.seq + i) * hid4 + h * {d4}u;"));
    w("    if (mask[b * p.seq + i] == 0u) {".into());
    for d in 0..d4 {
        w(format!("        ctx[out_base + {d}u] = vec4<f32>(0.0);"));
    }
    w("        return;\n    }".into());
    w("    let scale = bitcast<f32>(p.scale_bits);".into());
    w(format!("    let q_base = (b * p.seq + i) * row4 + h * {d4}u;"));
    for d in 0..d4 {
        w(format!("    let q{d} = qkv[q_base + {d}u] * scale;"));
        w(format!("    var acc{d} = vec4<f32>(0.0);"));
    }
    w("    var m = -3.0e38;".into());
    w("    var l = 0.0;".into());
    w("    for (var j = 0u; j < p.seq; j++) {".into());
    w("        if (mask[b * p.seq + j] == 0u) {\n            continue;\n        }".into());
    w(format!(
        "        let k_base = (b * p.seq + j) * row4 + hid4 + h * {d4}u;"
    ));
    let dots: Vec<String> = (0..d4).map(|d| format!("q{d} * qkv[k_base + {d}u]")).collect();
    w(format!("        let s4 = {};", dots.join(" + ")));
    w("        let s = s4.x + s4.y + s4.z + s4.w;".into());
    w("        let m_new = max(m, s);".into());
    w("        let corr = exp(m - m_new);".into());
    w("        let e = exp(s - m_new);".into());
    w("        l = l * corr + e;".into());
    w("        let v_base = k_base + hid4;".into());
    for d in 0..d4 {
        w(format!("        acc{d} = acc{d} * corr + qkv[v_base + {d}u] * e;"));
    }
    w("        m = m_new;".into());
    w("    }".into());
    w("    let inv = 1.0 / l;".into());
    for d in 0..d4 {
        w(format!("    ctx[out_base + {d}u] = acc{d} * inv;"));
    }
    w("}".into());
    s
}

fn matmul_groups(m: usize, n: usize, t: MatmulTile) -> Result<(u32, u32)> {
    let (gx, gy) = (n.div_ceil(4).div_ceil(t.cols4 * t.wg_x), m.div_ceil(t.rows * t.wg_y));
    if gx > MAX_GROUPS || gy > MAX_GROUPS {
        return Err(InferenceError::Backend(format!(
            "matmul {m}x{n} too large for one dispatch"
        )));
    }
    Ok((gx.max(1) as u32, gy.max(1) as u32))
}

/// Workgroups for one-workgroup-per-row kernels: `(x, y, rows per y step)`.
fn row_groups(rows: usize) -> Result<(u32, u32, u32)> {
    let per = rows.clamp(1, MAX_GROUPS);
    let gy = rows.div_ceil(per).max(1);
    if gy > MAX_GROUPS {
        return Err(InferenceError::Backend(format!(
            "{rows} rows too many for one dispatch"
        )));
    }
    Ok((per as u32, gy as u32, per as u32))
}

fn attention_groups(threads: usize) -> Result<(u32, u32)> {
    let wg = threads.div_ceil(64).max(1);
    let gx = wg.min(MAX_GROUPS);
    let gy = wg.div_ceil(gx);
    if gy > MAX_GROUPS {
        return Err(InferenceError::Backend("attention too large for one dispatch".into()));
    }
    Ok((gx as u32, gy as u32))
}

impl Backend for WgpuBackend {
    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    fn upload(&mut self, weights: Arc<BertWeights>) -> Result<()> {
        // The buffers below are sized by the tensors and indexed by the config.
        check_weights(&weights)?;
        let c = &weights.config;
        check_head_dim(c.head_dim())?;
        if !c.hidden_size.is_multiple_of(4) || !c.intermediate_size.is_multiple_of(4) {
            return Err(InferenceError::Backend(
                "the wgpu matmul needs hidden and intermediate sizes that are multiples of 4".into(),
            ));
        }
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let mat = |label: &str, w: &[f32], k: usize, n: usize| self.f32_buf(label, &pad_cols(w, k, n));
        let mut layers = Vec::with_capacity(weights.layers.len());
        for l in &weights.layers {
            layers.push(GpuLayer {
                qkv_w: mat("qkv_w", &l.qkv_w, h, 3 * h)?,
                qkv_b: mat("qkv_b", &l.qkv_b, 1, 3 * h)?,
                o_w: mat("o_w", &l.attn_out_w, h, h)?,
                o_b: mat("o_b", &l.attn_out_b, 1, h)?,
                ln1_g: self.f32_buf("ln1_g", &l.ln1_g)?,
                ln1_b: self.f32_buf("ln1_b", &l.ln1_b)?,
                ff_in_w: mat("ff_in_w", &l.ff_in_w, h, i)?,
                ff_in_b: mat("ff_in_b", &l.ff_in_b, 1, i)?,
                ff_out_w: mat("ff_out_w", &l.ff_out_w, i, h)?,
                ff_out_b: mat("ff_out_b", &l.ff_out_b, 1, h)?,
                ln2_g: self.f32_buf("ln2_g", &l.ln2_g)?,
                ln2_b: self.f32_buf("ln2_b", &l.ln2_b)?,
            });
        }
        let model = GpuModel {
            word: self.f32_buf("word_emb", &weights.word_emb)?,
            pos: self.f32_buf("pos_emb", &weights.pos_emb)?,
            typ: self.f32_buf("type_emb", &weights.type_emb)?,
            emb_ln_g: self.f32_buf("emb_ln_g", &weights.emb_ln_g)?,
            emb_ln_b: self.f32_buf("emb_ln_b", &weights.emb_ln_b)?,
            layers,
            weights,
        };
        self.take_errors()?;
        self.model = Some(model);
        // Bind groups referenced the old weights.
        *self.workspace.lock().map_err(|_| gpu_err("workspace lock poisoned"))? = None;
        Ok(())
    }

    fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let m = self
            .model
            .as_ref()
            .ok_or_else(|| InferenceError::Backend("no model uploaded".into()))?;
        // The embed shader indexes the word and position tables with these
        // ids and positions; an out-of-range read on the GPU is undefined,
        // so every id is checked before anything is dispatched.
        check_batch(batch, &m.weights)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut start = 0;
        while start < batch.len() {
            // Grow the chunk while its padded size stays within MAX_PASS_TOKENS.
            let mut end = start;
            let mut longest = 0;
            while end < batch.len() {
                let l = longest.max(batch[end].len());
                if (end + 1 - start) * l > MAX_PASS_TOKENS && end > start {
                    break;
                }
                longest = l;
                end += 1;
            }
            out.extend(self.forward(m, &batch[start..end])?);
            start = end;
        }
        Ok(out)
    }

    fn matmul(&self, a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
        self.kernel_matmul(a, b, None, m, k, n, false)
    }
}
