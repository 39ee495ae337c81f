"""Point-to-point transport of the distributed runner: activations and gradients over gloo/NCCL.

    transport = DistTransport(stage, ranks, torch.device("cpu"), groups)   # one per stage
    transport.begin_step(microbatches, training=True)
    transport.send_activation(stage, 0, packet); transport.finish()

Shapes: an activation is sent as two messages: a header (int64 tensor of ``HEADER_LEN``: tuple
flag, tensor count, then dtype code, rank and sizes of each tensor), so the receiver allocates
exactly what comes whatever the micro-batch size or sequence length, then the tensors as one
byte buffer (one tensor's own bytes, without a copy; several packed). A gradient needs no
header: it has the shapes and dtypes of the floating-point outputs the receiver sent for that
micro-batch.

Receives are posted ahead (gloo): gloo moves a message only once its receive is posted, so a
receive posted only when its action comes waits for the sender's progress thread to answer,
which on a busy CPU costs milliseconds per message (README, "How ranks talk"). Each step posts its activation receives at
its start and the receive of each gradient as the activation goes out (``DistTransport``).
Matched by order (NCCL; the runner's ``transport="ordered"``), each receive is posted when
its action comes, with exactly the size of what is sent.

Tags: every message names its (kind, source stage, destination stage, micro-batch, part), so
the stage pairs that share one pair of ranks (several stages per rank) never mix.

Failures of a peer surface as PeerError, naming the action, the peer and the cause.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist

from executor.runtime.interpreter import Packet

__all__ = ["HEADER_LEN", "DistTransport", "PeerError", "decode_header", "encode_header", "pack",
           "read_header", "unpack"]

HEADER_LEN = 64
_PARTS = 4  # tags: (microbatch * pairs + pair) * _PARTS + part; part 0 header, 1 tensors,
# 2 tensors larger than the receive posted for them (see DistTransport), 3 a graph template
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64)
T = TypeVar("T")


class PeerError(RuntimeError):
    """Communication with a neighbouring rank failed (it failed, was killed or hangs)."""


_MAX_TAG = 2**31 - 1  # gloo's tags are 32-bit


def _tag(pair: int, pairs: int, microbatch: int, part: int) -> int:
    """The tag of ``part`` of micro-batch i's message over stage pair number ``pair`` (of
    ``pairs``: every (src, dst) that crosses ranks, each direction its own): unique per (kind,
    source stage, destination stage, micro-batch), so any number of stage pairs can share
    one pair of ranks (several stages per rank)."""
    tag = (microbatch * pairs + pair) * _PARTS + part
    if tag > _MAX_TAG:
        raise ValueError(f"micro-batch {microbatch} over {pairs} stage pairs needs message tag "
                         f"{tag}, beyond the backend's {_MAX_TAG}; use fewer micro-batches or "
                         f"stages")
    return tag


def encode_header(packet: Packet, template_bytes: int = 0) -> torch.Tensor:
    """The int64 header describing ``packet``'s tensors (see module docstring): word 0 is the
    tuple flag plus twice the bytes of the pickled template that follows (graph stages), word 1
    the tensor count, then per tensor its dtype code (plus 32 when a gradient comes back for
    it), its rank and its sizes."""
    words = [int(packet.is_tuple) + 2 * template_bytes, len(packet.tensors)]
    for t, grad in zip(packet.tensors, packet.needs_grad, strict=True):
        if t.dtype not in _DTYPES:
            raise TypeError(f"a stage output has dtype {t.dtype}, which the executor cannot "
                            f"send; use one of {', '.join(map(str, _DTYPES))}")
        words += [_DTYPES.index(t.dtype) + 32 * int(grad), t.dim(), *t.shape]
    if len(words) > HEADER_LEN:
        raise ValueError(f"a stage output of {len(packet.tensors)} tensors with shapes "
                         f"{[tuple(t.shape) for t in packet.tensors]} does not fit the "
                         f"{HEADER_LEN}-word header; pass fewer or lower-rank tensors between "
                         f"stages")
    return torch.tensor(words + [0] * (HEADER_LEN - len(words)), dtype=torch.int64)


def read_header(header: torch.Tensor) -> tuple[bool, list[tuple[torch.dtype, list[int]]],
                                               tuple[bool, ...], int]:
    """Inverse of ``encode_header``: the tuple flag, each tensor's (dtype, shape), whether a
    gradient comes back for each, and the bytes of the template that follows."""
    words = header.tolist()
    is_tuple, count, pos = bool(words[0] & 1), words[1], 2
    specs, grads = [], []
    for _ in range(count):
        code, ndim = words[pos], words[pos + 1]
        specs.append((_DTYPES[code % 32], words[pos + 2:pos + 2 + ndim]))
        grads.append(code >= 32)
        pos += 2 + ndim
    return is_tuple, specs, tuple(grads), words[0] >> 1


def decode_header(header: torch.Tensor) -> tuple[bool, list[tuple[torch.dtype, list[int]]]]:
    """The tuple flag and each tensor's (dtype, shape) of a header."""
    is_tuple, specs, _, _ = read_header(header)
    return is_tuple, specs


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _layout(specs: Sequence[tuple[torch.dtype, Sequence[int]]]) -> tuple[list[int], int]:
    """Byte offsets of tensors packed into one buffer (each aligned to 8 bytes) and its size."""
    offsets, total = [], 0
    for dtype, shape in specs:
        offsets.append(total)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        total += -(-nbytes // 8) * 8
    return offsets, total


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several tensors as one uint8 message (a lone tensor is sent as it is, without a copy)."""
    offsets, total = _layout([(t.dtype, t.shape) for t in tensors])
    buf = torch.empty(total, dtype=torch.uint8, device=tensors[0].device)
    for t, off in zip(tensors, offsets, strict=True):
        raw = t.detach().reshape(-1).view(torch.uint8)
        buf[off:off + raw.numel()].copy_(raw)
    return buf


def unpack(buf: torch.Tensor, specs: Sequence[tuple[torch.dtype, Sequence[int]]]
           ) -> tuple[torch.Tensor, ...]:
    """Inverse of ``pack``: views of ``buf`` with the given dtypes and shapes."""
    offsets, _ = _layout(specs)
    out = []
    for (dtype, shape), off in zip(specs, offsets, strict=True):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append(buf[off:off + nbytes].view(dtype).reshape(tuple(shape)))
    return tuple(out)


class _Posted(NamedTuple):
    """A receive already handed to the backend: its work handle and the buffer it fills."""

    work: Any
    buffer: torch.Tensor


class DistTransport:
    """Point-to-point transport for ``stage``, one of this rank's stages; ``ranks[k]`` is stage
    k's global rank (several stages may share one) and ``groups[src, dst]`` the group carrying
    messages from stage src to stage dst, for every pair of stages on different ranks that
    exchange messages: the same pairs on every rank, whose sorted order numbers the tags
    (``_tag``). ``sources``: the stages on other ranks this one receives activations from
    (messages within the rank go by ``routing.RankTransport``'s mailbox).

    Receives are posted early: gloo moves a message only once its receive is posted (the
    sender's data waits for the receiver's "ready"), so a receive posted when the action needs
    it stalls until the busy sender's progress thread answers. ``begin_step`` posts the step's
    activation headers and, from the second step on, their bodies (into a buffer as large as
    the previous step's body of that micro-batch, which both sides know; a larger body goes
    on a second tag after a small filler, so a change of shape stays correct), and sending an
    activation in training posts the receive of its gradient (whose shapes are the sent
    tensors'). ``post_early=False`` (NCCL, which matches by order and exact size) posts each
    receive when it is needed."""

    def __init__(self, stage: int, ranks: Sequence[int], device: torch.device,
                 groups: Mapping[tuple[int, int], Any], timeout_s: float = 60.0,
                 post_early: bool = True, sources: Sequence[int] | None = None) -> None:
        self.stage, self.ranks, self.device, self.groups = stage, list(ranks), device, groups
        self.sources = list(sources) if sources is not None else (
            [stage - 1] if stage > 0 else [])
        self.post_early = post_early
        self._pair = {pair: j for j, pair in enumerate(sorted(groups))}  # the same on all ranks
        self.timeout = timedelta(seconds=timeout_s)
        self._pending: list[tuple[Any, torch.Tensor]] = []
        self._posted: dict[tuple[int, int], _Posted] = {}  # by (peer, tag)
        self._body_bytes: dict[tuple[int, int], int] = {}  # (peer, micro-batch) -> last body bytes
        self._training = True

    def _guard(self, what: str, peer: int, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (RuntimeError, ValueError) as exc:  # DistBackendError is a RuntimeError
            raise PeerError(
                f"stage {self.stage} (rank {self.ranks[self.stage]}): {what} with stage {peer} "
                f"(rank {self.ranks[peer]}) failed: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. That rank "
                f"(or one beyond it) has probably failed, been killed or hung; see its own "
                f"error") from exc

    def _out(self, peer: int, microbatch: int, part: int) -> int:
        """The tag of a message from this stage to stage ``peer``."""
        return _tag(self._pair[self.stage, peer], len(self._pair), microbatch, part)

    def _in(self, peer: int, microbatch: int, part: int) -> int:
        """The tag of a message from stage ``peer`` to this stage."""
        return _tag(self._pair[peer, self.stage], len(self._pair), microbatch, part)

    def begin_step(self, microbatches: int, training: bool) -> None:
        """Post this step's activation receives (a stage with sources)."""
        self._training = training and self.post_early
        if not self.post_early:
            return
        what = "posting the receives of the activations"
        for src in self.sources:
            for i in range(microbatches):
                self._post(torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device),
                           src, self._in(src, i, 0), what)
                if self._body_bytes.get((src, i)):
                    self._post(torch.empty(self._body_bytes[src, i], dtype=torch.uint8,
                                           device=self.device), src, self._in(src, i, 1), what)

    def _isend(self, tensor: torch.Tensor, peer: int, tag: int, what: str) -> None:
        tensor = tensor.contiguous()
        group, dst = self.groups[self.stage, peer], self.ranks[peer]
        work = self._guard(what, peer, lambda: dist.isend(tensor, dst, group=group, tag=tag))
        self._pending.append((work, tensor))

    def _post(self, tensor: torch.Tensor, peer: int, tag: int, what: str) -> None:
        group, src = self.groups[peer, self.stage], self.ranks[peer]
        work = self._guard(what, peer, lambda: dist.irecv(tensor, src, group=group, tag=tag))
        self._posted[peer, tag] = _Posted(work, tensor)

    def _recv(self, tensor: torch.Tensor | None, peer: int, tag: int, what: str) -> torch.Tensor:
        """Wait for the receive of ``tag`` from ``peer``, posting it into ``tensor`` unless
        already posted."""
        if (peer, tag) not in self._posted:
            assert tensor is not None
            self._post(tensor, peer, tag, what)
        posted = self._posted.pop((peer, tag))
        self._guard(what, peer, lambda: posted.work.wait(self.timeout))
        return posted.buffer

    @staticmethod
    def _recv_buffer(specs: Sequence[tuple[torch.dtype, Sequence[int]]],
                     device: torch.device) -> torch.Tensor:
        if len(specs) == 1:
            dtype, shape = specs[0]
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        return torch.empty(_layout(specs)[1], dtype=torch.uint8, device=device)

    def _send_tensors(self, tensors: Sequence[torch.Tensor], peer: int,
                      microbatch: int, what: str) -> None:
        if tensors:
            body = tensors[0] if len(tensors) == 1 else pack(tensors)
            self._isend(body, peer, self._out(peer, microbatch, 1), what)

    def _recv_tensors(self, specs: Sequence[tuple[torch.dtype, Sequence[int]]], peer: int,
                      microbatch: int, what: str) -> tuple[torch.Tensor, ...]:
        if not specs:
            return ()
        tag = self._in(peer, microbatch, 1)
        buf = self._recv(None if (peer, tag) in self._posted
                         else self._recv_buffer(specs, self.device), peer, tag, what)
        return (buf,) if len(specs) == 1 else unpack(buf, specs)

    def send_activation(self, stage: int, peer: int, microbatch: int, packet: Packet) -> None:
        what = f"sending the activation of micro-batch {microbatch} to stage {peer}"
        template = (pickle.dumps(packet.template) if packet.template is not None else b"")
        header = encode_header(packet, len(template)).to(self.device)
        self._isend(header, peer, self._out(peer, microbatch, 0), what)
        if template:
            self._isend(torch.frombuffer(bytearray(template), dtype=torch.uint8).to(self.device),
                        peer, self._out(peer, microbatch, 3), what)
        tensors = [t.contiguous() for t in packet.tensors]
        body = (pack(tensors) if len(tensors) > 1 else tensors[0].reshape(-1).view(torch.uint8)
                if tensors else torch.empty(0, dtype=torch.uint8, device=self.device))
        posted = self._body_bytes.get((peer, microbatch)) or None  # the receiver's posted bytes
        if self.post_early:
            self._body_bytes[peer, microbatch] = body.numel()
        if posted is not None and body.numel() > posted:  # fill the posted receive, then send
            self._isend(torch.zeros(min(8, posted), dtype=torch.uint8, device=self.device),
                        peer, self._out(peer, microbatch, 1), what)
            self._isend(body, peer, self._out(peer, microbatch, 2), what)
        elif body.numel():
            self._isend(body, peer, self._out(peer, microbatch, 1), what)
        if self._training:  # the gradient comes back with the shapes of the tensors sent
            grads = [(t.dtype, list(t.shape)) for t, g in zip(tensors, packet.needs_grad,
                                                              strict=True) if g]
            if grads:
                self._post(self._recv_buffer(grads, self.device), peer,
                           self._in(peer, microbatch, 1),
                           f"posting the receive of the gradient of micro-batch {microbatch}")

    def recv_activation(self, stage: int, peer: int, microbatch: int) -> Packet:
        what = f"receiving the activation of micro-batch {microbatch} from stage {peer}"
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        is_tuple, specs, grads, template_bytes = read_header(
            self._recv(header, peer, self._in(peer, microbatch, 0), what))
        template = None
        if template_bytes:
            raw = self._recv(torch.empty(template_bytes, dtype=torch.uint8, device=self.device),
                             peer, self._in(peer, microbatch, 3), what)
            template = pickle.loads(raw.cpu().numpy().tobytes())
        nbytes = _layout(specs)[1] if len(specs) != 1 else _nbytes(*specs[0])
        posted = self._body_bytes.get((peer, microbatch)) or None
        if self.post_early:
            self._body_bytes[peer, microbatch] = nbytes
        tag = self._in(peer, microbatch, 1)
        if posted is not None and nbytes > posted:  # the posted receive holds a filler
            self._recv(None, peer, tag, what)
            tag = self._in(peer, microbatch, 2)
        if not nbytes:
            return Packet(tuple(torch.empty(tuple(shape), dtype=dtype, device=self.device)
                                for dtype, shape in specs), is_tuple, grads, template)
        buf = self._recv(None if (peer, tag) in self._posted else
                         torch.empty(nbytes, dtype=torch.uint8, device=self.device),
                         peer, tag, what)
        return Packet(unpack(buf[:nbytes], specs), is_tuple, grads, template)

    def send_grad(self, stage: int, peer: int, microbatch: int,
                  grads: tuple[torch.Tensor, ...]) -> None:
        self._send_tensors(grads, peer, microbatch,
                           f"sending the gradient of micro-batch {microbatch} to stage {peer}")

    def recv_grad(self, stage: int, peer: int, microbatch: int,
                  like: tuple[tuple[torch.Size, torch.dtype], ...]) -> tuple[torch.Tensor, ...]:
        return self._recv_tensors([(dtype, list(shape)) for shape, dtype in like], peer,
                                  microbatch, f"receiving the gradient of micro-batch "
                                              f"{microbatch} from stage {peer}")

    def finish(self) -> None:
        """Wait until every send of the step has been delivered."""
        pending, self._pending = self._pending, []
        for work, _ in pending:
            self._guard("completing a send", self.stage,
                        lambda w=work: w.wait(self.timeout))  # type: ignore[misc]
