"""LoRA fine-tuning for gpt-oss: adapters on attention, router and experts; harmony data; training.

The package uses the core without reaching into it (it is a capability: nothing below it imports
it; the facade :func:`mlx_gptoss.load` applies an adapter with ``adapter=``); the core offers one seam for it: an MoE
layer's optional ``experts_lora`` child, whose low-rank update the kernels dispatcher applies to
the routed experts only. Attention and router adapters wrap the existing linear layers.

Contract between the modules of this package (each module owns its part):

``data.py`` — JSON lines -> harmony token ids with loss masks, rendered exactly as inference
renders (:class:`mlx_gptoss.chat.ChatSession`)::

    ds = load_dataset(path, encoding, train_on="final"|"assistant", max_seq_len=2048,
                      overflow="skip"|"truncate")
    ds.examples: list[Example]   # Example(ids: list[int], targets: list[bool], line: int)
    ds.skipped:  list[Skipped]   # Skipped(line: int, reason: str)
    # targets[i] is True when ids[i] is a trained token (predicted from ids[:i]); targets[0] False.
    # Malformed lines raise DataError("FILE:LINE: field ...: what is wrong") before training.

``adapters.py`` — the adapter modules and their placement::

    spec = LoRASpec(rank=8, alpha=16.0, targets=("attention", "experts"), layers=None|[ints],
                    rslora=False, dropout=0.0)   # bad fields raise LoRAError; to_dict()/from_dict()
    last_layers(n, num_layers) -> tuple[int, ...]  # for layers=: the last n layers
    apply_lora(model, spec, *, seed=None) -> None  # freezes the base, adds zero-B adapters (A random)
    remove_lora(model) -> None             # back to the plain base model
    lora_parameters(model) -> dict[str, mx.array]   # flat "layers.3.self_attn.q_proj.lora_a" -> array
    set_lora_parameters(model, flat, *, source="adapter") -> None   # names and shapes checked
    Key names (ours): layers.{i}.self_attn.{q_proj,k_proj,v_proj,o_proj}.{lora_a [r, in], lora_b [out, r]},
    layers.{i}.mlp.router.{lora_a, lora_b}, layers.{i}.mlp.experts_lora.{gate_up,down}.{lora_a [E, r, in],
    lora_b [E, out, r]}; gate_up rows keep the released interleaving (2j gate j, 2j+1 up j).
    Adapter parameters are float32; the update is scale * B A x with scale alpha/r (alpha/sqrt(r)
    with rslora). Dropout applies in training mode to attention/router adapters only (experts refuse it).

``files.py`` — adapter folders on disk: our format's file names, the checked readers (JSON,
weights: header, float dtypes, finite values) and the all-or-nothing folder writer.

``io.py`` — our adapter folder: ``adapters.safetensors`` + ``adapter_config.json`` (format,
version, the LoRASpec, and the base model's fingerprint; an adapter for another base is refused)::

    base_fingerprint(model_or_converted_folder) -> "sha256:..."   # arch fields + routers + sinks
    save_adapter(model, spec, dst, *, base_fingerprint, base_name=None, extra=None) -> dst  # atomic
    load_adapter(model, src) -> LoRASpec   # checks everything, applies; errors are LoRAError
    export_adapter(src, dst, *, fmt="peft"|"mlx-lm", model=None, force=False) -> dst
    adapter_identity(spec, flat) -> "sha256:..."   # the same adapter in any format or folder
    fused_adapters(model_dir) -> ...               # what was fused into a model: refused again
    (PEFT and mlx-lm folders are recognised and read too: ``formats.py``, which also writes them:
    ``export_peft``, ``export_mlxlm`` (``to_peft``/``to_mlxlm`` for the tensors); an export never
    replaces a folder it did not write, and only with ``force``.) ``apply_lora`` refuses a rank
    that no adapted matrix can hold.

``loss.py`` — a micro-batch's loss and its layer-wise backward: ``make_batch(examples) -> Batch``,
``batch_loss(model, batch)``, ``loss_and_grads(model, batch) -> (loss, grads)`` (one block's graph
at a time, the loss a chunk of trained positions at a time).

``train.py`` — the training loop (``TrainConfig``, ``train(model, train_ds, valid_ds, cfg,
on_progress=None, cancel=None) -> TrainResult``), resumable checkpoints (``checkpoint.py``:
state.json checked field by field, with the base and data fingerprints), metrics as JSON lines.
The rules a run follows, checked before anything is written: ``check_output_dir`` (never the
filesystem root, the current folder or home), ``check_metrics_file`` (a new file, or one a run
wrote), ``check_resume`` (adapter and data options fixed by the checkpoint, schedule options may
change: ``TrainResult.changed``), ``output_lock`` (one run per folder); a non-finite loss,
gradient or update stops the run (``TrainingDivergedError``) with the last good checkpoint kept.

``plan.py`` — a budget planned for training before the model loads:
``load(path, memory_budget=training_plan(path, spec, TrainConfig(out, ...), "9.5GB"))``.
"""
