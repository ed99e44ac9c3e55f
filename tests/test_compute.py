"""Device and compute dtype: resolving ``compute:`` settings, stages loaded onto a device, and bf16 training."""

import math

import pytest
import torch

from silotune.adapters import AdapterSettings, LoraSettings, PrefixSettings, apply_method
from silotune.client.runtime import SplitClient
from silotune.compute import Compute, ComputeSettings, check_dtype, fp32_trainables, resolve_device, resolve_dtype
from silotune.errors import ConfigError, ModelError
from silotune.models.partition import load_stage
from silotune.protocol.messages import ForwardActivations, Gradients, ReturnedActivations
from silotune.train.loss import lm_loss
from silotune.train.optim import OptimSettings
from silotune.transport.inprocess import InProcessTransport

from .test_exactness import batch


@pytest.fixture
def fake_gpus(monkeypatch):
    """PyTorch 'sees' n GPUs (default none): only the queries are patched, no CUDA is touched."""
    def see(n: int = 0, bf16: bool = True, name: str = "NVIDIA H100"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    return see


# ---- settings ----
def test_resolve_device_auto_and_cpu():
    assert resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device())
                                      if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_one_clear_line(fake_gpus, spec):
    fake_gpus(0)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError) as exc:
        resolve_device(spec)
    assert str(exc.value) == (f"compute.device: {spec!r} requested but no CUDA GPU is visible to PyTorch "
                              "(torch.cuda.is_available() is False); use compute.device: auto or cpu")


def test_cuda_index_past_the_visible_gpus(fake_gpus):
    fake_gpus(1)
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"'cuda:1' requested but PyTorch sees only 1 CUDA GPU \(cuda:0\)"):
        resolve_device("cuda:1")
    fake_gpus(2)
    with pytest.raises(ConfigError, match=r"sees only 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "cuda0", "", "mps", None, 0])
def test_bad_device_strings_are_rejected(spec):
    with pytest.raises(ConfigError, match=r"compute.device: must be auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


def test_resolve_and_check_dtype(fake_gpus):
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype("bf16") == torch.bfloat16
    for name in ("fp16", "float32", "bfloat16", None):
        with pytest.raises(ConfigError, match="compute.dtype: must be one of fp32, bf16"):
            resolve_dtype(name)
    check_dtype(torch.device("cpu"), torch.bfloat16)  # CPUs compute bf16
    fake_gpus(1, bf16=False, name="Tesla V100")
    check_dtype(torch.device("cuda:0"), torch.float32)
    with pytest.raises(ConfigError, match=r"bf16 requested but cuda:0 \(Tesla V100\) does not support bfloat16"):
        Compute.resolve(ComputeSettings("cuda", "bf16"))


def test_validate_names_the_key():
    def bad(key, msg):
        raise ConfigError(f"{key}: {msg}")

    for device in ("auto", "cpu", "cuda", "cuda:3"):
        ComputeSettings(device, "bf16").validate(bad)  # syntax only: the GPU is checked when resolved
    with pytest.raises(ConfigError, match="^compute.device: must be"):
        ComputeSettings("gpu:0").validate(bad)
    with pytest.raises(ConfigError, match="^compute.dtype: must be one of fp32, bf16, got 'fp16'"):
        ComputeSettings(dtype="fp16").validate(bad)


def test_compute_moves_and_describes(fake_gpus):
    assert Compute.default() == Compute() == Compute.resolve(ComputeSettings("cpu"))
    bf16 = Compute.resolve(ComputeSettings("cpu", "bf16"))
    assert (Compute.default().describe(), bf16.describe()) == ("cpu fp32", "cpu bf16")
    h, ids = torch.randn(2, 3), torch.arange(4)
    assert bf16.inputs(h).dtype == torch.bfloat16 and bf16.inputs(ids).dtype == torch.int64
    assert bf16.to_device(h).dtype == torch.float32
    wire = Compute.to_wire(bf16.inputs(h).requires_grad_(True))
    assert wire.dtype == torch.float32 and wire.device.type == "cpu" and not wire.requires_grad
    assert Compute.to_wire(ids).dtype == torch.int64
    assert Compute.default().inputs(h) is h and Compute.to_wire(h).data_ptr() == h.data_ptr()  # fp32 on the CPU: no copy
    fake_gpus(1)
    assert Compute(torch.device("cuda:0"), torch.bfloat16).describe() == "cuda:0 (NVIDIA H100) bf16"


# ---- stages ----
def test_load_stage_on_a_device_rebuilds_rotary_in_fp32(tiny_dirs):
    fp32 = load_stage(tiny_dirs["llama"], "head", 2, 1, device=torch.device("cpu"))
    bf16 = load_stage(tiny_dirs["llama"], "head", 2, 1, dtype=torch.bfloat16, device="cpu")
    for stage in (fp32, bf16):
        buffers = dict(stage.named_buffers())
        assert set(buffers) == {"rotary.inv_freq", "rotary.original_inv_freq"}
        for b in buffers.values():
            assert b.dtype == torch.float32 and b.device.type == "cpu" and torch.isfinite(b).all()
        assert torch.equal(buffers["rotary.inv_freq"], dict(fp32.named_buffers())["rotary.inv_freq"])
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ids, lengths = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0)), torch.tensor([7, 5])
    cos, sin = bf16.rotary(torch.zeros(1, dtype=torch.bfloat16), torch.arange(7)[None])
    assert cos.dtype == sin.dtype == torch.bfloat16
    ref, out = fp32(ids, lengths), bf16(ids, lengths)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.05 * ref.abs().max().item())


def three_stages(model_dir, dtype, method="lora", device=None):
    """A LoRA (or prefix) head, trunk and tail in ``dtype``, trainables in fp32, with the same random B
    (head and tail on ``device``, the trunk on the CPU)."""
    adapters = AdapterSettings(method=method, lora=LoraSettings(r=4, alpha=8), prefix=PrefixSettings(length=3))
    stages = [load_stage(model_dir, part, 1, 1, dtype=dtype, device=None if part == "trunk" else device)
              for part in ("head", "trunk", "tail")]
    for stage in stages:
        apply_method(stage, adapters, seed=3)
        fp32_trainables(stage)  # what every party does over a bf16 base
        for name, p in stage.named_parameters():
            if "lora_B" in name:
                g = torch.Generator().manual_seed(len(stage.full_name(name)))
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return stages


def hand_step(stages, b):
    head, trunk, tail = stages
    dtype = next(trunk.parameters()).dtype
    h1 = head(b["input_ids"], b["lengths"])
    h2 = trunk(h1, b["lengths"])
    loss = lm_loss(tail(h2, b["lengths"]), b["labels"])
    loss.backward()
    assert h1.dtype == h2.dtype == dtype and loss.dtype == torch.float32
    return loss.item()


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_bf16_step_trains_fp32_adapters(tiny_dirs, method):
    b = batch(128)
    ref = hand_step(three_stages(tiny_dirs["llama"], torch.float32, method), b)
    stages = three_stages(tiny_dirs["llama"], torch.bfloat16, method)
    loss = hand_step(stages, b)
    assert math.isfinite(loss) and abs(loss - ref) < 0.05 * abs(ref)
    trained = 0
    for stage in stages:
        for name, p in stage.named_parameters():
            if p.requires_grad:
                trained += 1
                assert p.dtype == torch.float32, name
                assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
            else:
                assert p.dtype == torch.bfloat16, name
    assert trained


class Bf16Trunk:
    """A stand-in trunk server: runs a trunk stage in its own dtype on what it is sent, as TrunkServer does."""

    def __init__(self, trunk):
        self.trunk, self.dtype = trunk, next(trunk.parameters()).dtype

    def handle(self, msg):
        if isinstance(msg, ForwardActivations):
            self.h1 = msg.hidden.to(self.dtype).requires_grad_(True)
            self.h2 = self.trunk(self.h1, msg.lengths)
            return ReturnedActivations(msg.client, msg.step, hidden=Compute.to_wire(self.h2))
        assert isinstance(msg, Gradients)
        self.h2.backward(msg.grad.to(self.dtype))
        return Gradients(msg.client, msg.step, grad=Compute.to_wire(self.h1.grad))


def split_client(model_dir, dtype, method="lora", device="cpu"):
    head, trunk, tail = three_stages(model_dir, dtype, method, device)
    client = SplitClient(0, head, tail, InProcessTransport(Bf16Trunk(trunk)), OptimSettings(lr=1e-2),
                         compute=Compute(torch.device(device), dtype))
    return client, trunk


def test_split_client_in_bf16(tiny_dirs):
    b = batch(128)
    ref, _ = split_client(tiny_dirs["llama"], torch.float32)
    client, trunk = split_client(tiny_dirs["llama"], torch.bfloat16)
    assert client.compute.describe() == "cpu bf16"
    before, logits, ref_logits = client.adapter_state(), client.logits(b), ref.logits(b)
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert torch.allclose(logits, ref_logits, atol=0.05 * ref_logits.abs().max().item())
    ref_loss, loss = ref.train_step(b), client.train_step(b)
    assert math.isfinite(loss) and abs(loss - ref_loss) < 0.05 * abs(ref_loss)
    for stage in (client.head, client.tail, trunk):
        grads = [p.grad for p in stage.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    after = client.adapter_state()
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the step moved the fp32 adapters
    client.load_adapter_state(before)
    assert all(torch.equal(before[k], v) for k, v in client.adapter_state().items())
    assert torch.equal(client.logits(b), logits)


def test_split_client_defaults_to_where_its_stages_are(tiny_dirs):
    head, tail = (apply_method(load_stage(tiny_dirs["llama"], part, 1, 1, dtype=torch.bfloat16), AdapterSettings(), 0)
                  for part in ("head", "tail"))
    assert {p.dtype for p in head.parameters() if p.requires_grad} == {torch.float32}  # adapters.lora casts them
    client = SplitClient(0, head, tail, InProcessTransport(None), OptimSettings())
    assert client.compute == Compute(torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in client.stepper.params} == {torch.float32}  # the client trains them in fp32
    with pytest.raises(ModelError, match="stage weights are bf16 but the compute dtype is fp32"):
        SplitClient(0, head, tail, InProcessTransport(None), OptimSettings(), compute=Compute.default())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_split_client_on_cuda_talks_to_a_cpu_trunk(tiny_dirs, method):
    b = batch(128)
    ref, _ = split_client(tiny_dirs["llama"], torch.float32, method)
    client, _ = split_client(tiny_dirs["llama"], torch.bfloat16, method, device="cuda")
    assert client.compute.describe().startswith("cuda:")
    assert {p.device.type for stage in (client.head, client.tail) for p in stage.parameters()} == {"cuda"}
    loss, ref_loss = client.train_step(b), ref.train_step(b)
    assert math.isfinite(loss) and abs(loss - ref_loss) < 0.05 * abs(ref_loss)
    assert client.logits(b).device.type == "cpu"
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in client.adapter_state().values())
