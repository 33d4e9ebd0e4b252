"""Expert worker: holds the experts placed on its group (every layer), runs the expert side
of every global step, and swaps in a new placement's weights without stopping."""

from __future__ import annotations

import threading
import time

from afdserve.build import load_progress, torch_dtype
from afdserve.expert.eplb import initial_placement
from afdserve.models.loader import open_checkpoint
from afdserve.models.moe_model import ExpertModel
from afdserve.pipeline_executor import ExpertPipelineExecutor
from afdserve.transport.base import Rows
from afdserve.transport.select import make_transport
from afdserve.transport.topology import Topology
from afdserve.worker import (
    IDLE_SLEEP_S,
    StepSync,
    WorkerSpec,
    broadcast_object,
    step_graphs_enabled,
    tp_all_reduce,
)


class ExpertWorker:
    def __init__(self, spec: WorkerSpec, topo: Topology, groups, rank: int):
        cfg, mc = spec.config, spec.config.model_config
        self.cfg, self.role = cfg, topo.role_of(rank)
        tp_group = groups.expert_tp[self.role.group] if topo.tp_e > 1 else None
        self.all_reduce, self.tp_size = tp_all_reduce(tp_group), topo.tp_e
        first = spec.show_progress and rank == topo.expert_rank(0, 0)
        with load_progress(mc.num_layers, "loading expert weights", first) as bar:
            experts = self._load(initial_placement(cfg), on_layer=lambda: bar.update(1))
        transport = None
        groups.wait_for_all()  # every rank has loaded its weights: the transport's set-up may start
        if self.role.tp_rank == 0:
            transport = make_transport(cfg.parallel.afd_transport, groups, rank, mc.hidden_size, mc.top_k,
                                       torch_dtype(cfg.dtype), cfg.scheduler.max_num_batched_tokens,
                                       cfg.parallel.micro_batches, spec.timeout_s)
        bcast = None
        if tp_group is not None:
            src = topo.expert_rank(self.role.group, 0)
            bcast = lambda rows: broadcast_object(_own(rows), src, tp_group)  # noqa: E731
        self.executor = ExpertPipelineExecutor(experts, transport, mc.num_layers, cfg.parallel.micro_batches, bcast,
                                               device=cfg.device)
        self.graphs = None  # whole steps in CUDA graphs (captured with the attention side's)
        if step_graphs_enabled(cfg, topo, transport):
            from afdserve.cuda_graphs import ExpertGraphs, capture_sizes

            self.graphs = ExpertGraphs(self.executor, capture_sizes(cfg))
        self.loader: threading.Thread | None = None
        self.next_experts: ExpertModel | None = None
        self.sync = StepSync(topo, rank, loading=lambda: self.loader is not None and self.loader.is_alive())

    def _load(self, placement, on_layer=lambda: None) -> ExpertModel:
        """This group's experts of every layer under ``placement`` (this TP rank's shard)."""
        cfg, mc = self.cfg, self.cfg.model_config
        per_layer = [placement.for_layer(layer).experts_of_group(self.role.group) for layer in range(mc.num_layers)]
        ckpt = open_checkpoint(cfg.model, cfg.load_format, torch_dtype(cfg.dtype), cfg.device, cfg.seed)
        experts = ExpertModel(mc, ckpt, per_layer, self.role.tp_rank, self.tp_size, all_reduce=self.all_reduce,
                              on_tensor=on_layer)
        ckpt.close()
        return experts

    def _load_in_background(self, placement) -> None:
        def load() -> None:
            self.next_experts = self._load(placement)
        self.loader = threading.Thread(target=load, name="afdserve-expert-load", daemon=True)
        self.loader.start()

    def loop(self) -> None:
        while True:
            step = self.sync.exchange(False, False)
            if step.stop:
                return
            if step.announced is not None:
                self._load_in_background(step.announced)
            if step.switch_to is not None:
                self.loader.join()
                if self.next_experts is None:
                    raise RuntimeError(f"expert group {self.role.group}: loading the new placement failed")
                self.executor.experts, self.next_experts, self.loader = self.next_experts, None, None
                if self.graphs is not None:  # the captured steps read the old experts' weights
                    self.graphs.capture()
            if not step.any_work:
                time.sleep(IDLE_SLEEP_S)
                continue
            (self.graphs or self.executor).step()


def _own(rows: list[Rows] | None) -> list[Rows] | None:
    """Rows in tensors of their own: a transport may hand out views of a large receive buffer,
    which pickling would copy whole."""
    if rows is None:
        return None
    return [Rows(r.x_ND.clone(), r.ids_NK.clone(), r.w_NK.clone()) for r in rows]
