//! Transformer building blocks shared by the vision and text towers, one struct per block, named
//! as in the Hugging Face checkpoint (`encoder.layers.N.self_attn.q_proj`, ...).

use tch::Tensor;

use super::ModelError;
use super::checkpoint::TensorReader;
use super::config::{Activation, TowerConfig};

/// `y = x W^T + b`.
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(
        r: &TensorReader,
        prefix: &str,
        inp: i64,
        out: i64,
        bias: bool,
    ) -> Result<Self, ModelError> {
        Ok(Linear {
            weight: r.get(&format!("{prefix}.weight"), &[out, inp])?,
            bias: if bias {
                Some(r.get(&format!("{prefix}.bias"), &[out])?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
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
        let qkv = Linear {
            weight: Tensor::cat(
                &[weight("q_proj")?, weight("k_proj")?, weight("v_proj")?],
                0,
            ),
            bias: Some(Tensor::cat(
                &[bias("q_proj")?, bias("k_proj")?, bias("v_proj")?],
                0,
            )),
        };
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

/// The feed-forward block: `fc2(act(fc1(x)))`.
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn load(r: &TensorReader, prefix: &str, cfg: &TowerConfig) -> Result<Self, ModelError> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            fc1: Linear::load(r, &format!("{prefix}.fc1"), h, i, true)?,
            fc2: Linear::load(r, &format!("{prefix}.fc2"), i, h, true)?,
            act: cfg.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.fc1.forward(x);
        let x = match self.act {
            Activation::QuickGelu => &x * (&x * 1.702).sigmoid(),
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
        };
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
        let x = x + self.attn.forward(&self.ln1.forward(x), causal);
        &x + self.mlp.forward(&self.ln2.forward(&x))
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
