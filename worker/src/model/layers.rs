//! Transformer building blocks shared by the vision and text towers, one struct per block, named
//! as in the Hugging Face checkpoint (`encoder.layers.N.self_attn.q_proj`, ...).

use tch::Tensor;

use super::Gemm;
use super::ModelError;
use super::checkpoint::TensorReader;
use super::config::{Activation, TowerConfig};
use super::panels::PanelLinear;

/// `y = x W^T + b`.
pub struct Linear {
    imp: LinearImp,
    out: i64,
}

/// The weights in the form their [`Gemm`] reads.
enum LinearImp {
    /// `[out, in]`.
    Libtorch {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// `[out, in]` in oneDNN's layout.
    OneDnn {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    Panels(PanelLinear),
}

impl Linear {
    pub fn load(
        r: &TensorReader,
        prefix: &str,
        inp: i64,
        out: i64,
        bias: bool,
    ) -> Result<Self, ModelError> {
        Self::load_scaled(r, prefix, [inp, out], bias, 1.0, 1.0)
    }

    /// A layer whose weight and bias are multiplied by constants at load time: with both equal
    /// to `s` it computes `s * (x W^T + b)`.
    fn load_scaled(
        r: &TensorReader,
        prefix: &str,
        [inp, out]: [i64; 2],
        bias: bool,
        weight_scale: f64,
        bias_scale: f64,
    ) -> Result<Self, ModelError> {
        let weight = r.get_scaled(&format!("{prefix}.weight"), &[out, inp], weight_scale)?;
        let bias = bias
            .then(|| r.get_scaled(&format!("{prefix}.bias"), &[out], bias_scale))
            .transpose()?;
        Ok(Self::new(weight, bias, r.gemm()))
    }

    /// From dense `[out, in]` weights, converted once for `gemm`.
    pub fn new(weight: Tensor, bias: Option<Tensor>, gemm: Gemm) -> Self {
        let out = weight.size()[0];
        let imp = match gemm {
            Gemm::Libtorch => LinearImp::Libtorch { weight, bias },
            Gemm::OneDnn => LinearImp::OneDnn {
                weight: weight.g_to_mkldnn(None),
                bias: bias.map(|b| b.g_to_mkldnn(None)),
            },
            Gemm::Panels => LinearImp::Panels(PanelLinear::new(&weight, bias.as_ref())),
        };
        Linear { imp, out }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        // oneDNN's inner product and the panels are 2-D: flatten the leading dimensions and
        // restore them after. oneDNN converts the activations in and out of its layout (a copy
        // each way, small next to the product).
        let mut shape = x.size();
        let flat = || x.reshape([-1, shape.last().copied().unwrap_or(1)]);
        let y = match &self.imp {
            LinearImp::Libtorch { weight, bias } => return x.linear(weight, bias.as_ref()),
            LinearImp::OneDnn { weight, bias } => flat()
                .g_to_mkldnn(None)
                .mkldnn_linear(weight, bias.as_ref())
                .to_dense(None, false),
            LinearImp::Panels(p) => p.forward(&flat()),
        };
        if let Some(last) = shape.last_mut() {
            *last = self.out;
        }
        y.reshape(shape)
    }
}

/// Layer normalisation over the last dimension.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn load(r: &TensorReader, prefix: &str, dim: i64, eps: f64) -> Result<Self, ModelError> {
        Ok(LayerNorm {
            weight: r.get(&format!("{prefix}.weight"), &[dim])?,
            bias: r.get(&format!("{prefix}.bias"), &[dim])?,
            dim,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// Multi-head self-attention. The checkpoint's separate q/k/v projections are fused into one
/// matrix at load time so each layer does one input projection instead of three.
pub struct Attention {
    qkv: Linear,
    out: Linear,
    heads: i64,
}

impl Attention {
    fn load(r: &TensorReader, prefix: &str, cfg: &TowerConfig) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let weight = |n: &str| r.get(&format!("{prefix}.{n}.weight"), &[h, h]);
        let bias = |n: &str| r.get(&format!("{prefix}.{n}.bias"), &[h]);
        let qkv = Linear::new(
            Tensor::cat(
                &[weight("q_proj")?, weight("k_proj")?, weight("v_proj")?],
                0,
            ),
            Some(Tensor::cat(
                &[bias("q_proj")?, bias("k_proj")?, bias("v_proj")?],
                0,
            )),
            r.gemm(),
        );
        Ok(Attention {
            qkv,
            out: Linear::load(r, &format!("{prefix}.out_proj"), h, h, true)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `x`: `[batch, tokens, hidden]`. `causal` masks future tokens (text tower).
    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let (b, t, h) = x
            .size3()
            .expect("attention input is [batch, tokens, hidden]");
        let head_dim = h / self.heads;
        // [b, t, 3, heads, head_dim] -> [3, b, heads, t, head_dim]
        let qkv = self
            .qkv
            .forward(x)
            .view([b, t, 3, self.heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let y = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, causal, None, false,
        );
        self.out.forward(&y.transpose(1, 2).reshape([b, t, h]))
    }
}

/// QuickGELU's constant: `quick_gelu(x) = x * sigmoid(1.702 x)`.
const QUICK_GELU: f64 = 1.702;

/// The feed-forward block: `fc2(act(fc1(x)))`.
///
/// For QuickGELU the constant is folded into the weights: `fc1` is loaded scaled by 1.702, so its
/// output is `u = 1.702 y`, and `silu(u) = u * sigmoid(u) = 1.702 * quick_gelu(y)`; `fc2`'s
/// weight is loaded divided by 1.702 to undo it. The activation is then one in-place SiLU pass
/// instead of a scale, a sigmoid and a product, each allocating a `[batch, tokens, 4 * hidden]`
/// tensor (about 9% of a ViT-B/32 forward on CPU).
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn load(r: &TensorReader, prefix: &str, cfg: &TowerConfig) -> Result<Self, ModelError> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        // fc1 scaled by 1.702 and fc2's weight by 1 / 1.702 for QuickGELU (see the type).
        let (up, down) = match cfg.activation {
            Activation::QuickGelu => (QUICK_GELU, 1.0 / QUICK_GELU),
            Activation::Gelu | Activation::GeluTanh => (1.0, 1.0),
        };
        let fc1 = Linear::load_scaled(r, &format!("{prefix}.fc1"), [h, i], true, up, up)?;
        let fc2 = Linear::load_scaled(r, &format!("{prefix}.fc2"), [i, h], true, down, 1.0)?;
        Ok(Mlp {
            fc1,
            fc2,
            act: cfg.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = self.fc1.forward(x);
        match self.act {
            // fc1/fc2 carry the 1.702 (see the type's comment).
            Activation::QuickGelu => _ = x.silu_(),
            Activation::Gelu => _ = x.gelu_("none"),
            Activation::GeluTanh => _ = x.gelu_("tanh"),
        }
        self.fc2.forward(&x)
    }
}

/// A pre-norm transformer layer.
pub struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    fn load(r: &TensorReader, prefix: &str, cfg: &TowerConfig) -> Result<Self, ModelError> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(EncoderLayer {
            ln1: LayerNorm::load(r, &format!("{prefix}.layer_norm1"), h, eps)?,
            attn: Attention::load(r, &format!("{prefix}.self_attn"), cfg)?,
            ln2: LayerNorm::load(r, &format!("{prefix}.layer_norm2"), h, eps)?,
            mlp: Mlp::load(r, &format!("{prefix}.mlp"), cfg)?,
        })
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        // The residual adds reuse the sublayers' fresh outputs instead of allocating.
        let x = self.attn.forward(&self.ln1.forward(x), causal).g_add_(x);
        let mut y = self.mlp.forward(&self.ln2.forward(&x));
        y.g_add_(&x)
    }
}

/// A stack of encoder layers.
pub struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    pub fn load(r: &TensorReader, prefix: &str, cfg: &TowerConfig) -> Result<Self, ModelError> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::load(r, &format!("{prefix}.layers.{i}"), cfg))
            .collect::<Result<_, _>>()?;
        Ok(Encoder { layers })
    }

    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for layer in &self.layers {
            x = layer.forward(&x, causal);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The oneDNN path flattens and restores the leading dimensions; both backends must give the
    /// same `[batch, tokens, out]` result, with and without a bias.
    #[test]
    fn onednn_and_libtorch_linear_agree() {
        if !tch::utils::has_mkldnn() {
            return;
        }
        let _guard = tch::no_grad_guard();
        tch::manual_seed(7);
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([3, 5, 8], opts);
        let w = Tensor::randn([6, 8], opts);
        let b = Tensor::randn([6], opts);
        for bias in [Some(b), None] {
            let dense = Linear::new(w.copy(), bias.as_ref().map(Tensor::copy), Gemm::Libtorch);
            let onednn = Linear::new(w.copy(), bias.as_ref().map(Tensor::copy), Gemm::OneDnn);
            let (a, c) = (dense.forward(&x), onednn.forward(&x));
            assert_eq!(c.size(), [3, 5, 6]);
            let diff = (&a - &c).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "max |diff| {diff}");
            // A 2-D input keeps its shape too.
            assert_eq!(onednn.forward(&x.get(0)).size(), [5, 6]);
        }
    }
}
