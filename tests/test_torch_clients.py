"""treeopt.torch.Optimizer driven by real torch clients, unchanged: every LR scheduler of
torch.optim.lr_scheduler that steps by group, GradScaler in float16, a LoRA adapter added
after the first step, torch.compile, torch.distributed.checkpoint's state-dict helpers,
nanoGPT's training loop, Hugging Face's Trainer and Lightning's Trainer.

Where torch has the same optimizer (AdamW, SGD), the run is compared with torch.optim's."""

import math

import pytest

torch = pytest.importorskip("torch", reason="torch client tests need torch")
import treeopt as optim  # noqa: E402
import treeopt.torch  # noqa: E402
from treeopt import filters as F  # noqa: E402

sched = torch.optim.lr_scheduler
LRS = (0.01, 0.001)


def mlp(seed=0, hidden=False):
    """Two layers (the input's and the output's, both AdamW's in Muon's recipe), or with
    ``hidden`` a hidden layer between them (``2``, Muon's)."""
    torch.manual_seed(seed)
    middle = [torch.nn.Linear(16, 16), torch.nn.Tanh()] if hidden else []
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), *middle, torch.nn.Linear(16, 3))


def batch(step):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(32, 6, generator=generator), torch.randn(32, 3, generator=generator)


def pair(kind="adamw"):
    """The same model twice: one with treeopt's optimizer, one with torch's, two groups each."""
    model_t, model_r = mlp(), mlp()
    first = F.glob("0.*")
    if kind == "adamw":
        treeopt_groups = [optim.AdamW(lr, bias_correction=True) for lr in LRS]
        reference = torch.optim.AdamW
    else:
        treeopt_groups = [optim.SGD(lr, momentum=0.9) for lr in LRS]
        reference = lambda groups: torch.optim.SGD(groups, momentum=0.9)  # noqa: E731
    opt_t = treeopt.torch.Optimizer(model_t, optim.MultiOptimizer(treeopt_groups, [first], names=["first", "second"]))
    opt_r = reference(
        [{"params": model_r[0].parameters(), "lr": LRS[0]}, {"params": model_r[2].parameters(), "lr": LRS[1]}]
    )
    return (model_t, opt_t), (model_r, opt_r)


def loss_of(model, step):
    x, y = batch(step)
    return torch.nn.functional.mse_loss(model(x), y)


SCHEDULERS = {
    "LambdaLR": lambda o: sched.LambdaLR(o, [lambda s: 0.9**s, lambda s: 1 / (1 + s)]),
    "MultiplicativeLR": lambda o: sched.MultiplicativeLR(o, lambda s: 0.95),
    "StepLR": lambda o: sched.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: sched.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ExponentialLR": lambda o: sched.ExponentialLR(o, gamma=0.8),
    "CosineAnnealingLR": lambda o: sched.CosineAnnealingLR(o, T_max=6, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    "OneCycleLR": lambda o: sched.OneCycleLR(o, max_lr=[0.02, 0.002], total_steps=10),
    "CyclicLR": lambda o: sched.CyclicLR(o, base_lr=[0.001, 0.0001], max_lr=[0.01, 0.001], step_size_up=3),
    "LinearLR": lambda o: sched.LinearLR(o, start_factor=0.1, total_iters=4),
    "ConstantLR": lambda o: sched.ConstantLR(o, factor=0.5, total_iters=3),
    "PolynomialLR": lambda o: sched.PolynomialLR(o, total_iters=8, power=2.0),
    "SequentialLR": lambda o: sched.SequentialLR(
        o, [sched.LinearLR(o, start_factor=0.2, total_iters=3), sched.ExponentialLR(o, gamma=0.7)], milestones=[3]
    ),
    "ChainedScheduler": lambda o: sched.ChainedScheduler(
        [sched.ConstantLR(o, factor=0.5, total_iters=2), sched.ExponentialLR(o, gamma=0.9)]
    ),
    "ReduceLROnPlateau": lambda o: sched.ReduceLROnPlateau(o, factor=0.5, patience=1),
}
MOMENTUM = {"OneCycleLR": "betas", "CyclicLR": "momentum"}  # these cycle momentum too


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_lr_scheduler_drives_treeopt_as_it_drives_torch_optim(name):
    (model_t, opt_t), (model_r, opt_r) = pair("sgd" if name == "CyclicLR" else "adamw")
    sched_t, sched_r = SCHEDULERS[name](opt_t), SCHEDULERS[name](opt_r)
    leaves = opt_t.optimizer.optimizers
    used = set()
    for step in range(10):
        expected = [group["lr"] for group in opt_r.param_groups]
        for model, opt in ((model_t, opt_t), (model_r, opt_r)):
            loss_of(model, step).backward()
            opt.step()
            opt.zero_grad()
        # the step just taken used the learning rates torch's optimizer used, as float32
        assert [float(leaf.learning_rate) for leaf in leaves] == [pytest.approx(lr, rel=1e-7) for lr in expected]
        used.add(float(leaves[0].learning_rate))
        if name in MOMENTUM:
            key = MOMENTUM[name]
            assert [getattr(leaf, key) for leaf in leaves] == [pytest.approx(g[key]) for g in opt_r.param_groups]
        for scheduler in (sched_t, sched_r):
            scheduler.step(1.0) if name == "ReduceLROnPlateau" else scheduler.step()
        assert [g["lr"] for g in opt_t.param_groups] == pytest.approx([g["lr"] for g in opt_r.param_groups])
    assert len(used) > 1 or name == "ReduceLROnPlateau" and opt_t.param_groups[0]["lr"] < LRS[0]
    for a, b in zip(model_t.parameters(), model_r.parameters()):  # the same training as torch.optim's
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_scheduler_state_dict_resumes_with_the_optimizer():
    (model, opt), _ = pair()
    scheduler = sched.CosineAnnealingLR(opt, T_max=8)
    for step in range(3):
        loss_of(model, step).backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
    saved_opt, saved_sched = opt.state_dict(), scheduler.state_dict()
    (model_b, opt_b), _ = pair()
    model_b.load_state_dict(model.state_dict())
    opt_b.load_state_dict(saved_opt)
    scheduler_b = sched.CosineAnnealingLR(opt_b, T_max=8, last_epoch=2)  # needs initial_lr from the state dict
    scheduler_b.load_state_dict(saved_sched)
    for step in range(3, 6):
        for m, o, s in ((model, opt, scheduler), (model_b, opt_b, scheduler_b)):
            loss_of(m, step).backward()
            o.step()
            o.zero_grad()
            s.step()
    for a, b in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ GradScaler
def scaled_training(model, opt, scaler, steps, poison=None):
    skipped = []
    for step in range(steps):
        x, y = batch(step)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        loss = torch.nn.functional.mse_loss(out.float(), y)
        scaler.scale(loss).backward()
        if step == poison:
            model[0].weight.grad[0, 0] = float("inf")
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
        opt.zero_grad(set_to_none=True)
    return skipped


def test_grad_scaler_in_float16_unscales_and_skips_like_torch_optim():
    """float16 autocast on the CPU (torch supports it there): the scaler finds infinities in
    the optimizer's gradients through param_groups, unscales them, and skips the step."""
    (model_t, opt_t), (model_r, opt_r) = pair()
    scaler_t, scaler_r = (torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in range(2))
    skipped_t = scaled_training(model_t, opt_t, scaler_t, 8, poison=3)
    skipped_r = scaled_training(model_r, opt_r, scaler_r, 8, poison=3)
    assert skipped_t == skipped_r and skipped_t[3] and sum(skipped_t) == 1
    assert int(opt_t.optimizer.step) == 7 and scaler_t.get_scale() == scaler_r.get_scale()
    for a, b in zip(model_t.parameters(), model_r.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_scaler_skipped_step_changes_nothing():
    (model, opt), _ = pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled_training(model, opt, scaler, 1)
    weights, state = (
        [p.clone() for p in model.parameters()],
        {k: v.clone() for k, v in opt.state_dict()["tensors"].items()},
    )
    assert scaled_training(model, opt, scaler, 1, poison=0) == [True]
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(state[k], v) for k, v in opt.state_dict()["tensors"].items())


# ------------------------------------------------------------------------------ LoRA, compile, DCP
class LoRA(torch.nn.Module):
    """A low-rank adapter around a frozen Linear: y = base(x) + x A^T B^T."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


def test_a_lora_adapter_added_after_the_first_step_is_trained():
    model = mlp(hidden=True)
    opt = treeopt.torch.Optimizer(
        model, optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [F.is_hidden_matrix])
    )
    loss_of(model, 0).backward()
    opt.step()
    opt.zero_grad()
    model[2] = LoRA(model[2])  # the usual fine-tuning move, after the optimizer exists
    frozen = model[2].base.weight.clone()
    losses = []
    for step in range(1, 30):
        loss = loss_of(model, 1)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert "2.lora_a" in opt.state and "2.lora_b" in opt.state and "2.weight" not in opt.state
    assert opt.optimizer.route("2.lora_a") == 0 and model[2].lora_b.abs().sum() > 0
    assert torch.equal(model[2].base.weight, frozen) and "2.base.weight" not in opt.state
    assert losses[-1] < losses[0]


@pytest.mark.slow
# inductor's own use of torch.jit, which torch deprecated
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_model_compiled_by_inductor_trains_with_one_state_per_parameter():
    model = mlp(hidden=True)
    compiled = torch.compile(model)
    opt = treeopt.torch.Optimizer(compiled, optim.muon_adamw())
    losses = []
    for step in range(5):
        loss = loss_of(compiled, 0)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    assert sorted(opt.state_dict()["metadata"]["parameters"]) == sorted(n for n, _ in model.named_parameters())


# DCP's helpers used in one process (no process group) say they assume so: what this test means
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized:UserWarning")
def test_distributed_checkpoint_state_dict_helpers_round_trip(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    def setup():  # a hidden layer for Muon between the input and output layers (AdamW's)
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
        )
        return model, treeopt.torch.Optimizer(
            model,
            optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [F.is_hidden_matrix], names=["muon", "adamw"]),
        )

    model, opt = setup()
    for step in range(3):
        loss_of(model, step).backward()
        opt.step()
        opt.zero_grad()
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}  # keyed by name
    assert set(osd["state"]["2.weight"]) == {"v"}
    flat = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    assert "state.2.bias.m" in flat and "state.2.weight.v" in flat
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict"):  # it keeps only the live groups' keys
        set_optimizer_state_dict(*setup(), flat, options=StateDictOptions(flatten_optimizer_state_dict=True))
    dcp.save({"optimizer": osd}, checkpoint_id=str(tmp_path))

    resumed = []
    for source in ("memory", "disk"):  # all loaded before the original moves on
        fresh_model, fresh_opt = setup()
        fresh_model.load_state_dict(model.state_dict())
        if source == "disk":
            loaded = {"optimizer": get_optimizer_state_dict(fresh_model, fresh_opt)}
            dcp.load(loaded, checkpoint_id=str(tmp_path))
            set_optimizer_state_dict(fresh_model, fresh_opt, loaded["optimizer"])
        else:
            set_optimizer_state_dict(fresh_model, fresh_opt, osd)
        assert int(fresh_opt.optimizer.step) == 3, source
        resumed.append((source, fresh_model, fresh_opt))
    for m, o in [(model, opt)] + [(m, o) for _, m, o in resumed]:
        for step in range(3, 5):
            loss_of(m, step).backward()
            o.step()
            o.zero_grad()
    for source, fresh_model, _ in resumed:
        for a, b in zip(model.parameters(), fresh_model.parameters()):
            assert torch.equal(a, b), source


# ------------------------------------------------------------------------------ nanoGPT's loop
class TinyGPT(torch.nn.Module):
    """The shape of nanoGPT's model (token and position embeddings, pre-norm blocks, a head
    tied to the token embedding), at toy size."""

    def __init__(self, vocab=16, block=8, width=16, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = torch.nn.Embedding(vocab, width), torch.nn.Embedding(block, width)
        # bias=False, nanoGPT's option: an attention key bias has no gradient but rounding
        # noise, which Adam scales to full steps of either sign
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(
                width, 2, 4 * width, dropout=0.0, batch_first=True, norm_first=True, bias=False
            )
            for _ in range(layers)
        )
        self.ln_f = torch.nn.LayerNorm(width, bias=False)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for embedding in (self.wte, self.wpe):
            torch.nn.init.normal_(embedding.weight, std=0.02)  # as nanoGPT initialises them
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(block))

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x, src_mask=self.mask, is_causal=True)
        logits = self.lm_head(self.ln_f(x))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def nanogpt_training(model, optimizer, iters=12, learning_rate=3e-3, warmup=3):
    """nanoGPT's train.py loop: get_lr, the param_groups loop, GradScaler (float16 autocast),
    unscale_ and clipping, scaler.step, zero_grad(set_to_none=True)."""

    def get_lr(it):
        if it < warmup:
            return learning_rate * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (iters - warmup)
        return 3e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - 3e-4)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    data = torch.arange(16).repeat(8)
    losses = []
    for it in range(iters):
        lr = get_lr(it)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        x = torch.stack([data[i : i + 8] for i in range(0, 32, 4)])
        y = torch.stack([data[i + 1 : i + 9] for i in range(0, 32, 4)])
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def nanogpt_pair():
    ours, theirs = TinyGPT(), TinyGPT()
    decay = F.ndim(min=2)  # nanoGPT's configure_optimizers: 2-D tensors decay, the rest do not
    opt = treeopt.torch.Optimizer(
        ours,
        optim.MultiOptimizer(
            [
                optim.AdamW(3e-3, betas=(0.9, 0.95), weight_decay=0.1, bias_correction=True),
                optim.AdamW(3e-3, betas=(0.9, 0.95), weight_decay=0.0, bias_correction=True),
            ],
            [decay],
        ),
    )
    named = dict(theirs.named_parameters())
    reference = torch.optim.AdamW(
        [
            {"params": [p for p in named.values() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in named.values() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=3e-3,
        betas=(0.9, 0.95),
    )
    return (ours, opt), (theirs, reference)


def test_nanogpt_training_loop_learns_and_matches_torch_adamw():
    (ours, opt), (theirs, reference) = nanogpt_pair()
    losses = nanogpt_training(ours, opt, iters=5)  # warm-up and cosine phases
    assert losses == pytest.approx(nanogpt_training(theirs, reference, iters=5), rel=1e-5)
    # the same math rounded in another order (MLX's form of the bias correction), through
    # float16 autocast: about 1e-6 apart after 5 steps on weights of about 0.02
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    (ours, opt), _ = nanogpt_pair()
    losses = nanogpt_training(ours, opt, iters=30, learning_rate=1e-2)
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------ trainers
def hugging_face_run(transformers, folder, resume=None):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)  # random weights from a config: nothing downloaded
    opt = treeopt.torch.Optimizer(model, optim.muon_adamw())
    scheduler = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=8)
    ids = torch.arange(16) % 8
    data = [{"input_ids": ids, "labels": ids} for _ in range(32)]
    args = transformers.TrainingArguments(
        output_dir=str(folder),
        max_steps=8,
        per_device_train_batch_size=4,
        logging_steps=4,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        save_steps=4,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, scheduler))
    used = []
    opt.register_step_post_hook(lambda o, args, kwargs: used.append(float(o.optimizer.optimizers[0].learning_rate)))
    result = trainer.train(resume_from_checkpoint=resume)
    return model, opt, trainer, result, used


def test_hugging_face_trainer_with_a_treeopt_optimizer_and_scheduler_resumes_exactly(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face client test needs transformers")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    model, opt, trainer, result, used = hugging_face_run(transformers, tmp_path)
    routes = {row.path: row.optimizer for row in opt.plan().rows}
    assert routes["transformer.wte.weight"] == "adamw" and routes["transformer.h.0.mlp.c_fc.weight"] == "muon"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert result.global_step == 8 and int(opt.optimizer.step) == 8
    assert logs[-1]["loss"] < logs[0]["loss"]
    warmup_then_cosine = [k / 2 if k < 2 else 0.5 * (1 + math.cos(math.pi * (k - 2) / 6)) for k in range(8)]
    assert used == pytest.approx([0.02 * f for f in warmup_then_cosine], rel=1e-6)  # what Muon stepped with
    # the Trainer saved the optimizer at step 4 (torch.save of state_dict()); resume from it
    resumed, resumed_opt, _, _, resumed_used = hugging_face_run(
        transformers, tmp_path, resume=tmp_path / "checkpoint-4"
    )
    assert int(resumed_opt.optimizer.step) == 8 and resumed_used == used[4:]
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# Lightning's own use of a torch API that torch deprecated, inside Trainer.fit
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_lightning_trainer_with_configure_optimizers():
    lightning = pytest.importorskip("lightning", reason="the Lightning client test needs lightning")

    class Regression(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(hidden=True)

        def training_step(self, batch, index):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            opt = treeopt.torch.Optimizer(
                self, optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [F.is_hidden_matrix])
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched.StepLR(opt, 5, 0.5), "interval": "step"}}

    x, y = batch(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = Regression()
    first = torch.nn.functional.mse_loss(module.net(x), y).item()
    trainer = lightning.Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert isinstance(opt, treeopt.torch.Optimizer) and int(opt.optimizer.step) == 12
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 * 0.5**2, 3e-3 * 0.5**2])
    assert torch.nn.functional.mse_loss(module.net(x), y).item() < first


def test_a_ddp_wrapped_model_in_one_process_keeps_the_bare_names(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        bare, wrapped = mlp(hidden=True), torch.nn.parallel.DistributedDataParallel(mlp(hidden=True))
        opt_bare, opt_ddp = (
            treeopt.torch.Optimizer(
                m, optim.MultiOptimizer([optim.Muon(0.02), optim.AdamW(3e-3)], [F.is_hidden_matrix])
            )
            for m in (bare, wrapped)
        )
        for step in range(3):
            for model, opt in ((bare, opt_bare), (wrapped, opt_ddp)):
                loss_of(model, step).backward()
                opt.step()
                opt.zero_grad()
        assert [g["param_names"] for g in opt_ddp.param_groups] == [g["param_names"] for g in opt_bare.param_groups]
        assert set(opt_ddp.state_dict()["tensors"]) == set(opt_bare.state_dict()["tensors"])
        for a, b in zip(bare.parameters(), wrapped.module.parameters()):
            assert torch.equal(a, b)
    finally:
        dist.destroy_process_group()
