//! Data parallelism through burn's own collective layer (`burn-collective`): N peers, one thread
//! and one device each, register with the collective and all-reduce their sums, locally
//! (several GPUs of one machine) or across nodes (a global orchestrator, `codespot
//! orchestrator`). codespot never moves tensors between peers itself.
//!
//! - Scoring: each peer scores a contiguous slice of the batches (the same slices as
//!   `score --shard`), then the accumulators are all-reduced: the result equals one device's
//!   scores up to f32 summation order.
//! - Tuning: each step's rows are split across the peers, each peer backpropagates its share
//!   (weighted by its share of the rows), and the gradients and the loss are all-reduced; the
//!   AdamW update then runs once, on peer 0's device.
//!
//! The collective's local server is one per process and backend, so one data-parallel section
//! runs at a time (a process-wide lock serialises them).

use anyhow::{anyhow, Context, Result};
use burn::collective::{self, CollectiveConfig, PeerId, ReduceOperation};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use std::sync::Mutex;

/// How peers find each other: all on this node, or this node's part of a multi-node run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Nodes {
    /// Nodes in the whole run (0 or 1 = this node alone).
    pub count: u32,
    /// This node's rank, 0..count (node 0 writes the outputs).
    pub rank: u32,
    /// The global orchestrator (`codespot orchestrator --port P` on one node): `ws://host:port`.
    pub orchestrator: Option<String>,
    /// This node's address as the others reach it: `ws://host:port`.
    pub address: Option<String>,
    /// Port of this node's tensor data service.
    pub data_port: Option<u16>,
}

impl Nodes {
    /// Nodes in the run (at least 1).
    pub fn world(&self) -> usize {
        self.count.max(1) as usize
    }

    /// The global rank of local peer `local` of `devices` on this node.
    pub(crate) fn global_rank(&self, local: usize, devices: usize) -> usize {
        self.rank as usize * devices + local
    }

    fn config(&self, devices: usize) -> Result<CollectiveConfig> {
        let cfg = CollectiveConfig::default().with_num_devices(devices);
        if self.count <= 1 {
            return Ok(cfg);
        }
        anyhow::ensure!(
            self.rank < self.count,
            "--node-rank {} is not below --nodes {}",
            self.rank,
            self.count
        );
        let (Some(g), Some(a), Some(p)) = (&self.orchestrator, &self.address, self.data_port) else {
            anyhow::bail!(
                "a run over {} nodes needs --orchestrator, --node-address and --data-port",
                self.count
            );
        };
        let addr = |s: &str| {
            s.parse()
                .map_err(|e| anyhow!("'{s}' is not an address like ws://host:port: {e:?}"))
        };
        Ok(cfg
            .with_num_nodes(self.count)
            .with_global_address(addr(g)?)
            .with_node_address(addr(a)?)
            .with_data_service_port(p))
    }
}

static SECTION: Mutex<()> = Mutex::new(());

/// One peer's handle inside [`run_peers`].
pub(crate) struct Peer<B: Backend> {
    pub rank: usize,
    pub device: B::Device,
}

impl<B: Backend> Peer<B> {
    fn id(&self) -> PeerId {
        PeerId::from(self.rank as u32)
    }

    /// Sum `t` over all peers (every peer gets the sum, on its own device).
    pub(crate) fn all_reduce_sum<const D: usize>(&self, t: Tensor<B, D>) -> Result<Tensor<B, D>> {
        let shape = t.shape();
        let flat = t.reshape([shape.num_elements()]).into_primitive().tensor();
        let summed = collective::all_reduce::<B>(self.id(), flat, ReduceOperation::Sum)
            .map_err(|e| anyhow!("all-reduce on peer {}: {e:?}", self.rank))?;
        Ok(Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed)).reshape(shape))
    }

    /// Sum a number over all peers (through a one-element tensor).
    pub(crate) fn all_reduce_scalar(&self, x: f64) -> Result<f64> {
        use burn::tensor::ElementConversion;
        let t = Tensor::<B, 1>::from_floats([x as f32], &self.device);
        Ok(self.all_reduce_sum(t)?.into_scalar().elem::<f64>())
    }
}

/// Run `work(peer, input)` on one peer per `(device, input)` (a thread each), registered with
/// burn's collective, and return the peers' results in rank order. `B` is the backend the
/// all-reduces run on (for autodiff models, the inner backend). A peer's work must not fail
/// between its all-reduces (the others would wait for it): check inputs before the first.
pub(crate) fn run_peers<B, I, T, F>(inputs: Vec<(B::Device, I)>, nodes: &Nodes, work: F) -> Result<Vec<T>>
where
    B: Backend,
    I: Send,
    T: Send,
    F: Fn(&Peer<B>, I) -> Result<T> + Sync,
{
    anyhow::ensure!(!inputs.is_empty(), "no devices to run on");
    let config = nodes.config(inputs.len())?;
    let _section = SECTION.lock().unwrap_or_else(|e| e.into_inner());
    collective::reset_collective::<B>();
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .into_iter()
            .enumerate()
            .map(|(rank, (device, input))| {
                let (config, work) = (config.clone(), &work);
                s.spawn(move || -> Result<T> {
                    let peer = Peer::<B> { rank, device };
                    collective::register::<B>(peer.id(), peer.device.clone(), config)
                        .map_err(|e| anyhow!("registering peer {rank} with the collective: {e:?}"))?;
                    let out = work(&peer, input);
                    collective::finish_collective::<B>(peer.id())
                        .map_err(|e| anyhow!("closing peer {rank}'s collective: {e:?}"))?;
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a data-parallel peer panicked"))?)
            .collect()
    });
    results
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.with_context(|| format!("peer {r}")))
        .collect()
}

/// `n` devices of backend `B`: indices 0..n of its default device's kind (GPUs 0..n on CUDA; on
/// the CPU every peer shares the one CPU device, which still runs the whole collective path).
pub fn peer_devices<B: Backend>(n: usize) -> Vec<B::Device> {
    use burn::tensor::backend::Device as _;
    let base = B::Device::default().to_id();
    (0..n)
        .map(|i| {
            let mut id = base;
            id.index_id = i as u16;
            B::Device::from_id(id)
        })
        .collect()
}

/// Run the global orchestrator of a multi-node collective on `port` until the process is killed.
pub(crate) fn orchestrator(port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the orchestrator's runtime")?;
    eprintln!("codespot orchestrator: listening on port {port}");
    rt.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}
