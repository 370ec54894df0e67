"""Expert parallelism for data-parallel serving: each MoE layer sends a token only to the ranks that hold
its chosen experts, and combines what comes back (DeepEP's normal mode: counts first, then the rows, by
`all_to_all_single`).

Every rank runs its own engine on its own requests, so in one step the ranks reach their MoE layers in
their own time and number (one forward or several, the MTP module's layer, none at all). The exchange
therefore goes in rounds that every rank enters together: each MoE call of an active rank is one round,
and a rank whose step is over keeps entering rounds with nothing to send (`finish`), answering the others'
tokens, until a round in which no rank is active. A round carries each (token, rank) unit's MoE layer, so
a rank computes what it receives with that layer's experts whatever layer it is at itself.

One round: [active, units] to every rank (all_to_all), then the units' rows and their routing (layer, the
chosen experts held there, their weights) on uneven splits; each rank sums its experts' outputs per unit in
fp32 and sends that sum back. A token whose k experts sit on r ranks travels to r ranks (itself included,
which costs no network) and comes back as r partial sums, against every token to every rank in the
broadcast design this replaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanoseek.model.moe import RoutedExperts


@dataclass
class ExchangeMetrics:
    """Per MoE layer: (token, rank) units this rank sent to other ranks, units it received from them, and
    the bytes of both directions (rows, routing and returned sums); rounds entered; (token, expert) pairs of
    this rank's tokens per expert (the load EPLB plans from), and pairs it computed on redundant copies."""

    dispatched: list[int]
    received: list[int]
    bytes_sent: list[int]
    tokens: list[int]  # this rank's tokens through each layer
    load: torch.Tensor  # [layers, experts]
    rounds: int = 0
    replica_pairs: int = 0

    @classmethod
    def for_layers(cls, layers: int, experts: int) -> ExchangeMetrics:
        zeros = lambda: [0] * layers  # noqa: E731
        return cls(zeros(), zeros(), zeros(), zeros(), torch.zeros(layers, experts, dtype=torch.long))

    def bytes_per_token(self) -> float:
        """Bytes a token moves between ranks per MoE layer, on average over the layers it went through."""
        tokens = sum(self.tokens)
        return sum(self.bytes_sent) / tokens if tokens else 0.0


@dataclass
class ExpertExchange:
    """This rank's side of the exchange for the MoE layers of one model (`experts`, in module order: the
    same order on every rank), over `group`. `placement[layer][e]` lists the ranks holding expert e (its
    home rank first, then any redundant copies); a layer's pairs are split between the copies by token."""

    experts: list[RoutedExperts]
    top_k: int  # experts per token: the width of every rank's routing rows
    rank: int
    world: int
    placement: list[list[list[int]]]
    group: dist.ProcessGroup | None = None
    metrics: ExchangeMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ExchangeMetrics.for_layers(len(self.experts), len(self.placement[0]))
        self._place(self.placement)
        for layer, module in enumerate(self.experts):
            module.remote = _Layer(self, layer)

    def _place(self, placement: list[list[list[int]]]) -> None:
        self.placement = placement
        copies = max(len(ranks) for layer in placement for ranks in layer)
        table = torch.full((len(placement), len(placement[0]), copies), -1, dtype=torch.long)
        for layer, experts in enumerate(placement):
            for expert, ranks in enumerate(experts):
                table[layer, expert, : len(ranks)] = torch.tensor(ranks)
        self._copies = table  # [layers, E, max copies] ranks, -1 padded
        self._count = (table >= 0).sum(-1)  # [layers, E]

    @torch.no_grad()
    def replicate(self, placement: list[list[list[int]]]) -> None:
        """Take a placement with redundant copies (every rank calls this with the same one): each copy's
        weights travel from the expert's home rank to the rank that will hold it, in one order on every rank
        (point to point: only those two take part), then the new placement routes pairs to the copies."""
        for layer, module in enumerate(self.experts):
            n_global = len(placement[layer])
            for expert, ranks in enumerate(placement[layer]):
                home, held = ranks[0], self.placement[layer][expert]
                for copy in (r for r in ranks[1:] if r not in held):
                    if self.rank == home:
                        slot = int(module.local_slots(torch.tensor([expert]))[0])
                        for name in module.expert_tensors():
                            dist.send(getattr(module, name)[slot].contiguous(), copy, group=self.group)
                    elif self.rank == copy:
                        tensors = [torch.empty_like(getattr(module, name)[0]) for name in module.expert_tensors()]
                        for tensor in tensors:
                            dist.recv(tensor, home, group=self.group)
                        module.add_replica(expert, tensors, n_global)
        self._place(placement)

    # --- the rounds -----------------------------------------------------------------------------------
    def call(self, layer: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """One MoE layer's routed output for this rank's tokens: x [N, hidden], weights/indices [N, k]."""
        load = self.metrics.load[layer]
        load += torch.bincount(indices.flatten().cpu(), minlength=load.shape[0])
        out, _ = self._round(layer, x, weights, indices)
        return out.to(x.dtype)

    def finish(self, like: torch.Tensor) -> int:
        """After this rank's step: answer the other ranks' rounds until none is active; the rounds served.
        `like` gives the dtype and device of the rows."""
        rows = like.new_empty(0, like.shape[-1])
        weights = torch.empty(0, self.top_k, device=like.device)
        indices = torch.empty(0, self.top_k, dtype=torch.long, device=like.device)
        served = 0
        while self._round(-1, rows, weights, indices)[1]:
            served += 1
        return served

    def _owners(self, layer: int, indices: torch.Tensor) -> torch.Tensor:
        """The rank that computes each (token, slot) pair: the expert's copy picked by the token's index."""
        copies, count = self._copies[layer].to(indices.device), self._count[layer].to(indices.device)
        token = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
        return copies[indices, token % count[indices]]

    def _round(
        self, layer: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, bool]:
        n = indices.shape[0]
        device, world = x.device, self.world
        owners = self._owners(layer, indices) if n else indices
        goes = F.one_hot(owners, world).any(1) if n else torch.zeros(0, world, dtype=torch.bool, device=device)
        dest, token = goes.t().nonzero(as_tuple=True)  # units (destination, token), sorted by destination
        send_counts = goes.sum(0)
        # routing of each unit: the layer, the experts computed at its destination (-1 elsewhere), their weights
        here = owners[token] == dest[:, None]
        routing = torch.cat(
            (
                torch.full((len(token), 1), float(layer), device=device),
                torch.where(here, indices[token], -1).float(),
                torch.where(here, weights[token].float(), 0.0),
            ),
            dim=1,
        )
        header = torch.stack((torch.full_like(send_counts, int(layer >= 0)), send_counts), dim=1)  # [world, 2]
        arrived = torch.empty_like(header)
        dist.all_to_all_single(arrived, header, group=self.group)
        anyone, recv_counts = bool(arrived[:, 0].any()), arrived[:, 1]
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        if not anyone:  # the last round of a step (every rank knows it: each one's flag reached every rank)
            return torch.zeros(n, x.shape[-1], dtype=torch.float32, device=device), anyone
        rows = x.new_empty(sum(recv_splits), x.shape[-1])
        dist.all_to_all_single(rows, x[token].contiguous(), recv_splits, send_splits, group=self.group)
        their_routing = routing.new_empty(sum(recv_splits), routing.shape[1])
        dist.all_to_all_single(their_routing, routing, recv_splits, send_splits, group=self.group)
        sums = self._compute(rows, their_routing)
        back = sums.new_empty(len(token), sums.shape[-1])
        dist.all_to_all_single(back, sums, send_splits, recv_splits, group=self.group)
        self._count_traffic(layer, n, send_splits, recv_splits, x, routing)
        out = torch.zeros(n, x.shape[-1], dtype=torch.float32, device=device)
        return out.index_add_(0, token, back), anyone

    def _compute(self, rows: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """This rank's experts over the units that arrived: per unit, the fp32 sum of its experts held here."""
        out = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        if not len(rows):
            return out
        k = (routing.shape[1] - 1) // 2
        layers, indices, weights = routing[:, 0].long(), routing[:, 1 : 1 + k].long(), routing[:, 1 + k :]
        for layer in layers.unique().tolist():
            mine, module = (layers == layer).nonzero().squeeze(1), self.experts[layer]
            out[mine] = module.local_sum(rows[mine], weights[mine], indices[mine])
            self.metrics.replica_pairs += int((module.local_slots(indices[mine]) >= module.n_experts).sum())
        return out

    def _count_traffic(
        self, layer: int, n: int, send: list[int], recv: list[int], x: torch.Tensor, routing: torch.Tensor
    ) -> None:
        m = self.metrics
        m.rounds += 1
        if layer < 0:
            return
        remote_sent = sum(s for r, s in enumerate(send) if r != self.rank)
        remote_recv = sum(s for r, s in enumerate(recv) if r != self.rank)
        unit = x.shape[-1] * x.element_size() + routing.shape[1] * 4  # a row and its routing out
        back = x.shape[-1] * 4  # its fp32 sum back
        m.tokens[layer] += n
        m.dispatched[layer] += remote_sent
        m.received[layer] += remote_recv
        m.bytes_sent[layer] += remote_sent * (unit + back)


class _Layer:
    """The hook a RoutedExperts module calls instead of computing locally (RoutedExperts.remote)."""

    def __init__(self, exchange: ExpertExchange, layer: int):
        self.exchange, self.layer = exchange, layer

    def __call__(self, experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
        return self.exchange.call(self.layer, x, weights, indices)


def home_placement(n_experts: int, world: int, layers: int) -> list[list[list[int]]]:
    """Expert e lives on rank e // (E / N) in every layer: the contiguous shards from_pretrained loads."""
    return [[[e // (n_experts // world)] for e in range(n_experts)] for _ in range(layers)]


def plan_replicas(load: list[list[int]], redundant: int, world: int) -> list[list[list[int]]]:
    """EPLB, greedily: in each MoE layer, the `redundant` most loaded experts get a second copy on the rank
    with the least load at that moment (never the expert's own), and each copy is expected to take half of
    the expert's pairs. load [layers][E]: (token, expert) pairs measured per expert."""
    placement = home_placement(len(load[0]), world, len(load))
    for layer, counts in enumerate(load):
        ranks = placement[layer]
        per_rank = [0.0] * world
        for expert, count in enumerate(counts):
            per_rank[ranks[expert][0]] += count
        for expert in sorted(range(len(counts)), key=lambda e: -counts[e])[:redundant]:
            home = ranks[expert][0]
            copy = min((r for r in range(world) if r != home), key=lambda r: (per_rank[r], r))
            ranks[expert].append(copy)
            per_rank[home] -= counts[expert] / 2
            per_rank[copy] += counts[expert] / 2
    return placement
