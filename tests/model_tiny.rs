//! The burn Llama on tiny random configs: gradients, RoPE layouts, KV cache, GGUF and export
//! round trips.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use codespot::model::{self, tokens_tensor, KvCache, Llama, LlamaConfig, ParamRef, RopeLayout};
use codespot::source::{HostTensor, Weights};

type F64 = NdArray<f64>;
type F64Ad = Autodiff<NdArray<f64>>;

fn batch() -> Vec<Vec<u32>> {
    vec![
        vec![3, 17, 42, 5, 60, 61, 2, 9, 33],
        vec![7, 7, 1, 0, 12, 50, 44, 3, 21],
    ]
}

/// Loss with element `i` of tensor `name` shifted by `delta`, all in f64 (the shift is applied
/// on the f64 model, so no f32 rounding enters the finite difference).
fn loss_of(cfg: &LlamaConfig, w: &Weights, name: &str, i: usize, delta: f64) -> f64 {
    let dev = Default::default();
    let m = Llama::<F64>::from_weights(cfg, w, &dev).unwrap().map_params(|n, t| {
        if n != name {
            return t;
        }
        let mut v: Vec<f64> = t.into_data().convert::<f64>().into_vec().unwrap();
        v[i] += delta;
        let len = v.len();
        burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(v, [len]), &dev)
    });
    let l = m.loss(tokens_tensor::<F64>(&batch(), &dev));
    l.into_data().convert::<f64>().into_vec::<f64>().unwrap()[0]
}

fn check_gradients(tied: bool) {
    let mut cfg = LlamaConfig::tiny(64);
    cfg.tie_word_embeddings = tied;
    let w = model::llama::random_weights(&cfg, 7);
    let dev = Default::default();
    let m = Llama::<F64Ad>::from_weights(&cfg, &w, &dev).unwrap();
    let loss = m.loss(tokens_tensor::<F64Ad>(&batch(), &dev));
    let grads = loss.backward();
    let mut checked = 0;
    for (name, p) in m.params() {
        let g: Vec<f64> = match p {
            ParamRef::Vector(p) => p
                .val()
                .grad(&grads)
                .unwrap()
                .into_data()
                .convert::<f64>()
                .into_vec()
                .unwrap(),
            ParamRef::Matrix(p) => p
                .val()
                .grad(&grads)
                .unwrap()
                .flatten::<1>(0, 1)
                .into_data()
                .convert::<f64>()
                .into_vec()
                .unwrap(),
        };
        let n = g.len();
        // Three elements per tensor: the largest gradient and two spread indices.
        let big = (0..n).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        for &i in &[big, n / 3, (n * 7) / 11] {
            let eps = 1e-5;
            let fd = (loss_of(&cfg, &w, &name, i, eps) - loss_of(&cfg, &w, &name, i, -eps)) / (2.0 * eps);
            let err = (fd - g[i]).abs();
            assert!(
                err <= 1e-9 + 1e-6 * g[i].abs().max(fd.abs()),
                "{name}[{i}]: autodiff {} vs finite difference {fd} (err {err})",
                g[i]
            );
            checked += 1;
        }
    }
    let expected = 3 * cfg.tensor_shapes().len();
    assert_eq!(checked, expected);
}

#[test]
fn gradients_match_central_finite_differences_tied() {
    check_gradients(true);
}

#[test]
fn gradients_match_central_finite_differences_untied() {
    check_gradients(false);
}

fn logits<B: Backend>(m: &Llama<B>, rows: &[Vec<u32>]) -> Vec<f64> {
    let dev = m.embed.val().device();
    m.forward(tokens_tensor::<B>(rows, &dev), None)
        .into_data()
        .convert::<f64>()
        .into_vec()
        .unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn interleaved_rope_on_permuted_weights_equals_half_rope() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 3);
    let dev = Default::default();
    let half = Llama::<F64>::from_weights(&cfg, &w, &dev).unwrap();
    // Permute Q/K rows the way llama.cpp's converter does and switch RoPE to interleaved.
    let mut wp = w.clone();
    for (name, t) in wp.tensors.iter_mut() {
        let heads = if name.ends_with("q_proj.weight") {
            cfg.num_attention_heads
        } else if name.ends_with("k_proj.weight") {
            cfg.num_key_value_heads
        } else {
            continue;
        };
        t.data = codespot::source::weights::permute_rows(&t.data, t.shape[0], t.shape[1], heads);
    }
    let mut icfg = cfg.clone();
    icfg.rope_layout = RopeLayout::Interleaved;
    let inter = Llama::<F64>::from_weights(&icfg, &wp, &dev).unwrap();
    let a = logits(&half, &batch());
    let b = logits(&inter, &batch());
    assert!(
        max_abs_diff(&a, &b) < 1e-10,
        "layouts disagree: {}",
        max_abs_diff(&a, &b)
    );
    // And the permutation matters: interleaved RoPE on unpermuted weights differs.
    let wrong = Llama::<F64>::from_weights(&icfg, &w, &dev).unwrap();
    assert!(max_abs_diff(&a, &logits(&wrong, &batch())) > 1e-4);
}

#[test]
fn permute_and_unpermute_are_inverse() {
    let data: Vec<f32> = (0..12 * 5).map(|x| x as f32).collect();
    let p = codespot::source::weights::permute_rows(&data, 12, 5, 3);
    assert_ne!(p, data);
    assert_eq!(codespot::source::weights::unpermute_rows(&p, 12, 5, 3), data);
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 11);
    let dev = Default::default();
    let m = Llama::<F64>::from_weights(&cfg, &w, &dev).unwrap();
    let seq = batch()[0].clone();
    let full = logits(&m, std::slice::from_ref(&seq));
    let v = cfg.vocab_size;
    let mut cache = KvCache::new(cfg.num_hidden_layers);
    // Prefill 4 tokens, then one at a time.
    let mut got: Vec<f64> = m
        .forward(tokens_tensor::<F64>(&[seq[..4].to_vec()], &dev), Some(&mut cache))
        .into_data()
        .convert::<f64>()
        .into_vec()
        .unwrap();
    for &t in &seq[4..] {
        let l: Vec<f64> = m
            .forward(tokens_tensor::<F64>(&[vec![t]], &dev), Some(&mut cache))
            .into_data()
            .convert::<f64>()
            .into_vec()
            .unwrap();
        got.extend(l);
    }
    assert_eq!(cache.len, seq.len());
    assert_eq!(got.len(), seq.len() * v);
    assert!(max_abs_diff(&full, &got) < 1e-10);
}

/// The last position's logits of every row, through the cache.
fn step_logits(m: &Llama<F64>, rows: &[Vec<u32>], cache: &mut KvCache<F64>) -> Vec<Vec<f64>> {
    let dev = Default::default();
    let t = rows[0].len();
    let l = m.forward(tokens_tensor::<F64>(rows, &dev), Some(cache));
    let [b, _, v] = l.dims();
    let flat: Vec<f64> = l.narrow(1, t - 1, 1).into_data().convert::<f64>().into_vec().unwrap();
    (0..b).map(|i| flat[i * v..(i + 1) * v].to_vec()).collect()
}

#[test]
fn left_padded_batch_decodes_each_row_as_alone() {
    for layout in [RopeLayout::Half, RopeLayout::Interleaved] {
        let mut cfg = LlamaConfig::tiny(64);
        cfg.rope_layout = layout;
        let w = model::llama::random_weights(&cfg, 17);
        let dev = Default::default();
        let m = Llama::<F64>::from_weights(&cfg, &w, &dev).unwrap();
        let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 2, 40, 33, 7], vec![12, 3], vec![8, 8, 61, 4]];
        let conts: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4], vec![9, 10, 11, 12], vec![20, 21, 22, 23]];
        // Each row alone: prefill, then one token at a time.
        let alone: Vec<Vec<Vec<f64>>> = prompts
            .iter()
            .zip(&conts)
            .map(|(p, c)| {
                let mut cache = KvCache::new(cfg.num_hidden_layers);
                let mut out = step_logits(&m, std::slice::from_ref(p), &mut cache);
                for &t in c {
                    out.extend(step_logits(&m, &[vec![t]], &mut cache));
                }
                out
            })
            .collect();
        // Together, left-padded to the longest prompt (the pad token is arbitrary: masked).
        let longest = prompts.iter().map(Vec::len).max().unwrap();
        let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                std::iter::repeat_n(63, longest - p.len())
                    .chain(p.iter().copied())
                    .collect()
            })
            .collect();
        let mut cache = KvCache::padded(cfg.num_hidden_layers, pads);
        let first = step_logits(&m, &rows, &mut cache);
        for r in 0..3 {
            assert!(
                max_abs_diff(&first[r], &alone[r][0]) < 1e-10,
                "{layout:?} prefill row {r}"
            );
        }
        // Two steps with all rows, then row 1 leaves and row 2 is repeated (as samples).
        let mut live = vec![0usize, 1, 2];
        for s in 0..4 {
            if s == 2 {
                cache.select_rows(&[0, 2, 2]);
                live = vec![0, 2, 2];
            }
            let step: Vec<Vec<u32>> = live.iter().map(|&r| vec![conts[r][s]]).collect();
            let got = step_logits(&m, &step, &mut cache);
            for (i, &r) in live.iter().enumerate() {
                assert!(
                    max_abs_diff(&got[i], &alone[r][s + 1]) < 1e-10,
                    "{layout:?} step {s} row {r}"
                );
            }
        }
        // In f16 (where the mask's −1e9 is −inf) a padded batch stays finite: a padding query
        // sees itself, never an all-masked row.
        let half = Llama::<codespot::backend::Cpu>::from_weights_as(
            &cfg,
            &w,
            &Default::default(),
            codespot::model::Dtype::F16,
        )
        .unwrap();
        let mut hc = KvCache::padded(
            cfg.num_hidden_layers,
            prompts.iter().map(|p| longest - p.len()).collect(),
        );
        let l = half.forward(tokens_tensor(&rows, &Default::default()), Some(&mut hc));
        let v: Vec<f32> = l.into_data().convert::<f32>().into_vec().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{layout:?}: f16 padded logits are finite"
        );
        // Without the mask the padding would be attended to: the test can fail.
        let mut unmasked = KvCache::new(cfg.num_hidden_layers);
        let wrong = step_logits(&m, &rows[1..2], &mut unmasked);
        assert!(max_abs_diff(&wrong[0], &alone[1][0]) > 1e-6);
    }
}

#[test]
fn map_params_and_to_weights_round_trip() {
    let cfg = LlamaConfig::tiny(64);
    let w = model::llama::random_weights(&cfg, 5);
    let dev = Default::default();
    let m = Llama::<F64>::from_weights(&cfg, &w, &dev).unwrap();
    let back = m.to_weights();
    assert_eq!(
        back.tensors.keys().collect::<Vec<_>>(),
        w.tensors.keys().collect::<Vec<_>>()
    );
    for (k, t) in &w.tensors {
        assert_eq!(&back.tensors[k], t, "{k}");
    }
    // Zeroing through map_params touches exactly the named tensor.
    let m = m.map_params(|name, t| {
        if name == "model.layers.1.mlp.up_proj.weight" {
            t.zeros_like()
        } else {
            t
        }
    });
    let z = m.to_weights();
    assert!(z.tensors["model.layers.1.mlp.up_proj.weight"]
        .data
        .iter()
        .all(|&x| x == 0.0));
    assert_eq!(
        z.tensors["model.layers.0.mlp.up_proj.weight"],
        w.tensors["model.layers.0.mlp.up_proj.weight"]
    );
}

#[test]
fn from_weights_reports_missing_and_misshapen_tensors() {
    let cfg = LlamaConfig::tiny(64);
    let mut w = model::llama::random_weights(&cfg, 5);
    let dev = burn::tensor::Device::<F64>::default();
    w.tensors.remove("model.layers.1.self_attn.v_proj.weight");
    let e = Llama::<F64>::from_weights(&cfg, &w, &dev).unwrap_err().to_string();
    assert!(
        e.contains("missing tensor 'model.layers.1.self_attn.v_proj.weight'"),
        "{e}"
    );
    let mut w = model::llama::random_weights(&cfg, 5);
    w.tensors
        .insert("model.norm.weight".into(), HostTensor::new(vec![3], vec![1.0; 3]));
    let e = Llama::<F64>::from_weights(&cfg, &w, &dev).unwrap_err().to_string();
    assert!(e.contains("'model.norm.weight' has shape [3], expected [32]"), "{e}");
}

#[test]
fn gguf_load_unpermutes_and_export_round_trips_through_hf_dir() {
    let dir = tempfile::tempdir().unwrap();
    for tied in [true, false] {
        let (path, cfg) = common::tiny_gguf(dir.path(), 21, tied);
        let ck = model::load(path.to_str().unwrap()).unwrap();
        assert_eq!(ck.config.num_hidden_layers, cfg.num_hidden_layers);
        assert_eq!(ck.config.tie_word_embeddings, tied);
        // Loading undid llama.cpp's permutation: weights equal the HF-layout originals.
        let orig = model::llama::random_weights(&cfg, 21);
        for (k, t) in &orig.tensors {
            assert_eq!(&ck.weights.tensors[k], t, "{k}");
        }
        let out = dir.path().join(format!("export-{tied}"));
        model::export::export_hf_dir(&ck.config, &ck.weights, &ck.tokenizer, &out, false).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let again = model::load(out.to_str().unwrap()).unwrap();
        assert_eq!(again.config.hidden_size, cfg.hidden_size);
        assert_eq!(again.config.tie_word_embeddings, tied);
        let dev = Default::default();
        let a = logits(
            &Llama::<F64>::from_weights(&ck.config, &ck.weights, &dev).unwrap(),
            &batch(),
        );
        let b = logits(
            &Llama::<F64>::from_weights(&again.config, &again.weights, &dev).unwrap(),
            &batch(),
        );
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        let text = "<|im_start|>user\ndef ret  x<|im_end|>";
        assert_eq!(
            ck.tokenizer.encode(text, false).unwrap(),
            again.tokenizer.encode(text, false).unwrap()
        );
        assert_eq!(again.tokenizer.chat_template, ck.tokenizer.chat_template);
        // Exporting over an existing directory needs --force.
        let e = model::export::export_hf_dir(&ck.config, &ck.weights, &ck.tokenizer, &out, false).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
    }
}

#[test]
fn tiny_tokenizer_uses_merges_and_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = common::tiny_gguf(dir.path(), 1, true);
    let ck = model::load(path.to_str().unwrap()).unwrap();
    let tok = &ck.tokenizer;
    let ids = tok.encode("<|im_start|>def", false).unwrap();
    assert_eq!(ids, vec![0, tok.token_id("def").unwrap()]);
    let chat = tok.apply_chat(&[model::Message::user("hi")], true).unwrap();
    assert_eq!(chat, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(tok.decode(&tok.encode(&chat, false).unwrap()).unwrap(), chat);
}

/// A tiny 3-layer model from a GGUF written in `dir`, loaded with its tokenizer.
fn tiny_model(
    dir: &std::path::Path,
) -> (
    codespot::model::Checkpoint,
    codespot::model::Llama<codespot::backend::Cpu>,
    codespot::model::LlamaConfig,
) {
    let (gg, cfg) = common::tiny_gguf(dir, 3, true);
    let ck = codespot::model::load(gg.to_str().unwrap()).unwrap();
    let m =
        codespot::model::Llama::<codespot::backend::Cpu>::from_weights(&ck.config, &ck.weights, &Default::default())
            .unwrap();
    (ck, m, cfg)
}

/// Bits per byte after a context: the continuation's first `max_tokens` tokens are scored
/// whatever the context's length (a 3-shot context longer than the cap once left one token),
/// and a context longer than the model's positions is cut from the left.
#[test]
fn bits_per_byte_scores_the_continuation_after_any_context() {
    let dir = tempfile::tempdir().unwrap();
    let (ck, m, cfg) = tiny_model(dir.path());
    let cont = "def f(x):\n    return x + 1\n";
    let n_cont = ck.tokenizer.encode(cont, false).unwrap().len();
    let short_ctx = "# add one\n";
    let long_ctx = "# a long preamble of examples\n".repeat(40);
    assert!(ck.tokenizer.encode(&long_ctx, false).unwrap().len() > 64);
    for ctx in [short_ctx, long_ctx.as_str()] {
        let (bits, bytes) = codespot::eval::bpb::nll_bits(&m, &ck.tokenizer, ctx, cont, 0, 64).unwrap();
        assert_eq!(bytes, cont.len(), "the whole continuation ({n_cont} tokens) is scored");
        assert!(bits > 1.0 * n_cont as f64, "{bits} bits for {n_cont} tokens");
    }
    // A cap below the continuation scores its first tokens only.
    let (_, bytes) = codespot::eval::bpb::nll_bits(&m, &ck.tokenizer, &long_ctx, cont, 0, 3).unwrap();
    let first3 = ck
        .tokenizer
        .decode(&ck.tokenizer.encode(cont, false).unwrap()[..3])
        .unwrap();
    assert_eq!(bytes, first3.len());
    // A context beyond the model's positions still works (cut from the left).
    let huge = "x ".repeat(cfg.max_position_embeddings * 2);
    let (bits, bytes) = codespot::eval::bpb::nll_bits(&m, &ck.tokenizer, &huge, cont, 0, 64).unwrap();
    assert!(bits.is_finite() && bytes == cont.len());
}

/// Many items whose contexts share their few-shot examples are scored through one KV cache of
/// the shared prefix: each item's bits equal its own full forward's, and items without a long
/// shared prefix (or with an empty continuation, or a context cut from the left) still work.
#[test]
fn shared_prefix_bits_equal_each_items_own_forward() {
    let dir = tempfile::tempdir().unwrap();
    let (ck, m, cfg) = tiny_model(dir.path());
    let tok = &ck.tokenizer;
    let shots = "# example\ndef f(x):\n    return x + 1\n\n".repeat(4);
    let ctxs: Vec<String> = ["# add two\n", "# double it\n", "", "# a\n"]
        .iter()
        .map(|q| format!("{shots}{q}"))
        .collect();
    let conts = [
        "def g(x):\n    return x + 2\n",
        "def h(x):\n    return 2 * x\n",
        "def k(): pass\n",
        "",
    ];
    let pairs: Vec<(&str, &str)> = ctxs.iter().map(|c| c.as_str()).zip(conts).collect();
    assert!(
        tok.encode(&shots, false).unwrap().len() > 16,
        "the prefix is long enough to be cached"
    );
    let check = |pairs: &[(&str, &str)], cap: usize| {
        let many = codespot::eval::bpb::nll_bits_many(&m, tok, pairs, 0, cap).unwrap();
        assert_eq!(many.len(), pairs.len());
        for ((ctx, cont), (bits, bytes)) in pairs.iter().zip(&many) {
            let (b1, n1) = codespot::eval::bpb::nll_bits(&m, tok, ctx, cont, 0, cap).unwrap();
            assert_eq!(*bytes, n1);
            assert!(
                (bits - b1).abs() <= 1e-4 * b1.abs().max(1.0),
                "{bits} vs {b1} for {cont:?}"
            );
            if cont.is_empty() {
                assert_eq!((*bits, *bytes), (0.0, 0));
            } else {
                assert!(*bits > 0.0);
            }
        }
    };
    check(&pairs, 64);
    check(&pairs, 3);
    // No shared prefix: empty contexts (the separator stands before each document), of
    // different lengths, in right-padded batches.
    let long_doc = "def a(x):\n    return [i * x for i in range(10)]\n".repeat(3);
    check(
        &[
            ("", "def a(): pass\n"),
            ("", "x = 1\n"),
            ("", long_doc.as_str()),
            ("", ""),
        ],
        64,
    );
    check(&[("", "def a(): pass\n"), ("", long_doc.as_str())], 5);
    // Contexts beyond the model's positions, cut from the left: still equal.
    let huge = format!("{}{shots}", "y ".repeat(cfg.max_position_embeddings * 2));
    check(&[(huge.as_str(), conts[0]), (huge.as_str(), conts[1])], 64);
}

/// The hand-written f32 forward pass (`model::fused`, the CPU backend's default without a KV
/// cache) gives burn's logits: both RoPE layouts, tied and untied heads, query groups of 2
/// and 3, rows over several attention query blocks.
#[test]
fn fused_forward_gives_burns_logits() {
    type Cpu = codespot::backend::Cpu;
    // Rows longer than the attention's 64-row query blocks for the first config.
    let long: Vec<Vec<u32>> = (0..2)
        .map(|r| (0..150).map(|i| ((i * 11 + r * 5 + 3) % 64) as u32).collect())
        .collect();
    for (c, cfg) in common::fused_variants()
        .into_iter()
        .chain(common::other_archs())
        .enumerate()
    {
        let rows = if c == 0 { long.clone() } else { batch() };
        let w = codespot::model::llama::random_weights(&cfg, 21 + c as u64);
        let fused = Llama::<Cpu>::from_weights(&cfg, &w, &Default::default()).unwrap();
        let mut reference = fused.clone();
        reference.fused = false;
        let (a, b) = (logits(&fused, &rows), logits(&reference, &rows));
        let max = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&a, &b);
        assert!(
            max > 0.1 && diff <= 2e-5 * max,
            "config {c}: max |logit| {max}, diff {diff:e}"
        );
    }
}

/// Every parameter's gradient of the mean next-token loss of `rows` (by name), and the loss.
fn named_grads<B: burn::tensor::backend::AutodiffBackend>(
    m: &Llama<B>,
    rows: &[Vec<u32>],
) -> (Vec<(String, Vec<f64>)>, f64) {
    let names: Vec<String> = m.params().into_iter().map(|(n, _)| n).collect();
    let mut grads = vec![None; names.len()];
    let loss = m.loss_backward(rows, 1.0, |i, g| {
        grads[i] = Some(g.into_data().convert::<f64>().into_vec::<f64>().unwrap());
    });
    (
        names
            .into_iter()
            .zip(grads.into_iter().map(|g| g.expect("a gradient")))
            .collect(),
        loss,
    )
}

/// The float64 tensors of a golden safetensors file, by name.
fn golden_f64(path: &std::path::Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F64, "{n}");
            let data = v
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (n, (v.shape().to_vec(), data))
        })
        .collect()
}

/// Qwen2 (q/k/v biases; tied and untied heads) and Gemma ((1 + w) norms, GeGLU, scaled
/// embeddings) against transformers' own `Qwen2ForCausalLM` and `GemmaForCausalLM`: tiny
/// random models saved by `save_pretrained`, with transformers' float64 logits, loss and every
/// parameter's gradient (`tools/reference_models.py`, in `tests/golden/`), read back through
/// codespot's HF loader; gradients through codespot's block-at-a-time backward, in f64 and on
/// the f32 CPU backend.
#[test]
fn qwen2_and_gemma_match_transformers_logits_and_gradients() {
    type Cpu = codespot::backend::Cpu;
    let rows: Vec<Vec<u32>> = vec![
        vec![5, 9, 2, 40, 33, 7, 1, 60, 12, 3],
        vec![12, 3, 8, 8, 61, 4, 0, 19, 27, 50],
    ];
    let cases = [
        ("qwen2_tiny_tied", model::Arch::Qwen2, true),
        ("qwen2_tiny_untied", model::Arch::Qwen2, false),
        ("gemma_tiny", model::Arch::Gemma, true),
    ];
    for (dir, arch, tied) in cases {
        let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(dir);
        let cfg = LlamaConfig::from_hf_json(&d.join("config.json")).unwrap();
        assert_eq!(
            (cfg.arch, cfg.qkv_bias, cfg.tie_word_embeddings),
            (arch, arch == model::Arch::Qwen2, tied)
        );
        let w = codespot::source::weights::from_safetensors(&[d.join("model.safetensors")]).unwrap();
        let want = golden_f64(&d.join("expected.safetensors"));
        let dev = Default::default();
        let m = Llama::<F64>::from_weights(&cfg, &w, &dev).unwrap();
        // Logits.
        let got = logits(&m, &rows);
        let exp = &want["logits"].1;
        let max = exp.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&got, exp);
        // Both sides hold RoPE's cos/sin in f32 (transformers computes them in float32 even in a
        // float64 model; codespot rounds its f64 angles' cos/sin to f32), so f64 agrees to ~1e-7.
        eprintln!("{dir}: logits relative difference {:.1e}", diff / max);
        assert!(
            max > 0.5 && diff <= 1e-6 * max,
            "{dir}: logits max {max}, diff {diff:e}"
        );
        // Read as Llama's block (biases zeroed), the model is another one: the check can fail.
        let mut no_bias = w.clone();
        for (n, t) in no_bias.tensors.iter_mut() {
            if n.ends_with(".bias") {
                t.data.iter_mut().for_each(|x| *x = 0.0);
            }
        }
        let as_llama = LlamaConfig {
            arch: model::Arch::Llama,
            ..cfg.clone()
        };
        let nb = Llama::<F64>::from_weights(&as_llama, &no_bias, &dev).unwrap();
        assert!(
            max_abs_diff(&logits(&nb, &rows), exp) > 1e-3 * max,
            "{dir}: the architecture matters"
        );
        // Loss and every gradient, in f64 and in f32 (the CPU backend).
        let check = |grads: Vec<(String, Vec<f64>)>, loss: f64, rel: f64, what: &str| {
            let l = want["loss"].1[0];
            assert!((loss - l).abs() <= rel * l, "{dir} {what}: loss {loss} vs {l}");
            assert_eq!(
                grads.len(),
                cfg.tensor_shapes().len(),
                "{dir} {what}: one gradient per tensor"
            );
            for (name, g) in grads {
                let e = &want[&format!("grad.{name}")].1;
                let max = e.iter().fold(0f64, |m, v| m.max(v.abs()));
                let diff = max_abs_diff(&g, e);
                eprintln!("{dir} {what}: {name}: relative difference {:.1e}", diff / max);
                assert!(
                    max > 0.0 && diff <= rel * max,
                    "{dir} {what}: {name}: max {max:e}, diff {diff:e}"
                );
            }
        };
        let ad = Llama::<F64Ad>::from_weights(&cfg, &w, &dev).unwrap();
        let (grads, loss) = named_grads(&ad, &rows);
        check(grads, loss, 5e-6, "f64");
        // The CPU backend's hand-written block, then burn's ops on it.
        let mut cpu = Llama::<Autodiff<Cpu>>::from_weights(&cfg, &w, &Default::default()).unwrap();
        assert!(cpu.uses_fused(), "{dir} takes the hand-written path");
        let (grads, loss) = named_grads(&cpu, &rows);
        check(grads, loss, 2e-5, "f32 hand-written");
        cpu.fused = false;
        let (grads, loss) = named_grads(&cpu, &rows);
        check(grads, loss, 2e-5, "f32 burn");
    }
}
