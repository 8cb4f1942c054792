//! Candle models: MLP, the CIFAR-10 tutorial CNN, a small residual CNN, logistic regression
//! and a small transformer language model.
//!
//! Parameters are initialised from a seeded stream (not candle's global RNG), so a
//! model is a pure function of its spec, input shape and seed.

use crate::train::conv_pool::conv_relu_pool;
use crate::train::linear::linear;
use crate::train::loss::cross_entropy;
use crate::train::manifest::{Manifest, TensorKind, TensorSpec};
use crate::train::pool::pooled_side;
use crate::train::resnet::ResNet;
use crate::train::rng::seeded_rng;
use crate::train::transformer::{Transformer, TransformerShape, next_tokens};
use anyhow::{Context, Result, bail, ensure};
use candle_core::{D, Device, Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Which model to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ModelSpec {
    /// Fully connected layers with ReLU; `hidden` lists the hidden widths.
    Mlp {
        /// Hidden layer widths, input side first.
        hidden: Vec<usize>,
    },
    /// conv 5×5×64, max-pool 3/2, conv 5×5×64, max-pool 3/2, fc 384, fc 192, fc classes.
    Cnn,
    /// One linear layer and softmax.
    Logreg,
    /// A residual CNN with group norm (see [`crate::train::resnet`]).
    Resnet {
        /// Channels of the first stage (the others have 2× and 4×).
        width: usize,
    },
    /// A decoder-only transformer over byte tokens (see [`crate::train::transformer`]).
    Transformer {
        /// Number of blocks.
        layers: usize,
        /// Width of the residual stream.
        dim: usize,
        /// Attention heads per block.
        heads: usize,
        /// Longest window it reads.
        context: usize,
    },
}

impl ModelSpec {
    /// The default MLP: one hidden layer of 256 units.
    pub fn default_mlp() -> Self {
        ModelSpec::Mlp { hidden: vec![256] }
    }

    /// The default transformer for windows of `context` tokens: 2 blocks of width 64 with
    /// 4 heads.
    pub fn default_transformer(context: usize) -> Self {
        ModelSpec::Transformer {
            layers: 2,
            dim: 64,
            heads: 4,
            context,
        }
    }

    /// True for a language model: its samples are token windows and every position is
    /// predicted.
    pub fn is_language_model(&self) -> bool {
        matches!(self, ModelSpec::Transformer { .. })
    }

    /// Parses `mlp`, `mlp:256,128`, `cnn`, `resnet`, `resnet:WIDTH`, `logreg`,
    /// `transformer` or `transformer:LAYERS,DIM,HEADS,CONTEXT`.
    pub fn parse(s: &str) -> Result<Self> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        match (name, arg) {
            ("resnet", "") => Ok(Self::Resnet { width: 16 }),
            ("resnet", width) => Ok(Self::Resnet {
                width: positive(width, "resnet width", s)?,
            }),
            ("transformer", "") => Ok(Self::default_transformer(64)),
            ("transformer", dims) => {
                let numbers = positives(dims, "transformer size", s)?;
                let &[layers, dim, heads, context] = numbers.as_slice() else {
                    bail!(
                        "{s:?}: a transformer is transformer:LAYERS,DIM,HEADS,CONTEXT, \
                         e.g. transformer:2,64,4,64"
                    );
                };
                Ok(Self::Transformer {
                    layers,
                    dim,
                    heads,
                    context,
                })
            }
            ("mlp", "") => Ok(Self::default_mlp()),
            ("mlp", widths) => Ok(Self::Mlp {
                hidden: positives(widths, "MLP width", s)?,
            }),
            ("cnn", "") => Ok(Self::Cnn),
            ("logreg", "") => Ok(Self::Logreg),
            _ => bail!(
                "unknown model {s:?}; expected mlp, mlp:W1,W2,..., cnn, resnet[:WIDTH], logreg \
                 or transformer:LAYERS,DIM,HEADS,CONTEXT"
            ),
        }
    }
}

/// `text` of model spec `spec` as a positive integer; `what` names it in the error.
fn positive(text: &str, what: &str, spec: &str) -> Result<usize> {
    match text.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("{what} {text:?} in {spec:?} is not a positive integer"),
    }
}

/// A comma-separated list of positive integers of model spec `spec`.
fn positives(list: &str, what: &str, spec: &str) -> Result<Vec<usize>> {
    list.split(',').map(|n| positive(n, what, spec)).collect()
}

impl std::fmt::Display for ModelSpec {
    /// The spelling [`ModelSpec::parse`] reads back: `mlp:256`, `cnn`, `logreg`. (An MLP
    /// without hidden layers, which `parse` never makes, prints as `mlp:` and would read
    /// back as the default MLP: that model is `logreg`.)
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Mlp { hidden } => {
                let widths: Vec<String> = hidden.iter().map(ToString::to_string).collect();
                write!(f, "mlp:{}", widths.join(","))
            }
            Self::Cnn => f.write_str("cnn"),
            Self::Logreg => f.write_str("logreg"),
            Self::Resnet { width } => write!(f, "resnet:{width}"),
            Self::Transformer {
                layers,
                dim,
                heads,
                context,
            } => write!(f, "transformer:{layers},{dim},{heads},{context}"),
        }
    }
}

enum Layer {
    /// `y = x Wᵀ + b`, optionally followed by ReLU.
    Linear { w: usize, b: usize, relu: bool },
    /// 5×5 same-padded convolution, ReLU, then 3×3 max-pool with stride 2.
    ConvPool { w: usize, b: usize },
    /// `[B, C, H, W]` to `[B, C·H·W]`.
    Flatten,
}

/// How a model computes its logits from its parameters.
enum Graph {
    /// A chain of layers.
    Layers(Vec<Layer>),
    /// A residual CNN.
    ResNet(ResNet),
    /// A transformer language model.
    Transformer(Transformer),
}

/// A model replica: its manifest, parameters and layer graph.
pub struct Model {
    spec: ModelSpec,
    manifest: Manifest,
    vars: Vec<Var>,
    graph: Graph,
    sample_shape: Vec<usize>,
    device: Device,
}

/// Collects a model's parameters, in manifest order, as it is built.
pub(crate) struct Builder {
    tensors: Vec<TensorSpec>,
    vars: Vec<Var>,
    rng: rand_chacha::ChaCha8Rng,
    device: Device,
}

impl Builder {
    /// Adds a tensor holding `data` (row-major over `shape`); returns its index.
    fn push(
        &mut self,
        name: String,
        shape: Vec<usize>,
        kind: TensorKind,
        data: Vec<f32>,
    ) -> Result<usize> {
        let var = Var::from_vec(data, shape.as_slice(), &self.device)?;
        self.tensors.push(TensorSpec { name, shape, kind });
        self.vars.push(var);
        Ok(self.vars.len() - 1)
    }

    /// Adds a norm's gain (ones) and shift (zeros) over `channels`, named `{name}.gain`
    /// and `{name}.shift`; returns their indices.
    pub(crate) fn norm(&mut self, name: &str, channels: usize) -> Result<(usize, usize)> {
        let gain = self.push(
            format!("{name}.gain"),
            vec![channels],
            TensorKind::Norm,
            vec![1.0; channels],
        )?;
        let shift = self.push(
            format!("{name}.shift"),
            vec![channels],
            TensorKind::Norm,
            vec![0.0; channels],
        )?;
        Ok((gain, shift))
    }

    /// Adds a tensor initialised uniformly in ±1/sqrt(fan_in) (PyTorch's default).
    pub(crate) fn param(
        &mut self,
        name: String,
        shape: Vec<usize>,
        kind: TensorKind,
        fan_in: usize,
    ) -> Result<usize> {
        let bound = 1.0 / (fan_in as f32).sqrt();
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-bound..bound))
            .collect();
        self.push(name, shape, kind, data)
    }

    fn linear(&mut self, name: &str, inp: usize, out: usize, relu: bool) -> Result<Layer> {
        let w = self.param(
            format!("{name}.weight"),
            vec![out, inp],
            TensorKind::Weight,
            inp,
        )?;
        let b = self.param(format!("{name}.bias"), vec![out], TensorKind::Bias, inp)?;
        Ok(Layer::Linear { w, b, relu })
    }

    fn conv(&mut self, name: &str, cin: usize, cout: usize) -> Result<Layer> {
        let fan_in = cin * 25;
        let w = self.param(
            format!("{name}.weight"),
            vec![cout, cin, 5, 5],
            TensorKind::Weight,
            fan_in,
        )?;
        let b = self.param(format!("{name}.bias"), vec![cout], TensorKind::Bias, fan_in)?;
        Ok(Layer::ConvPool { w, b })
    }
}

/// Output side length after the CNN's 3×3 max-pool with stride 2.
fn pooled(side: usize) -> usize {
    pooled_side(side, 3, 2)
}

impl Model {
    /// Builds `spec` for samples of `sample_shape` and `classes` outputs, initialised from `seed`.
    pub fn new(
        spec: &ModelSpec,
        sample_shape: &[usize],
        classes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        ensure!(
            classes >= 2,
            "a classifier needs at least 2 classes, got {classes}"
        );
        let inputs: usize = sample_shape.iter().product();
        let mut b = Builder {
            tensors: Vec::new(),
            vars: Vec::new(),
            rng: seeded_rng(seed, "init", 0),
            device: device.clone(),
        };
        let mut layers = Vec::new();
        let mut built: Option<Graph> = None;
        let label = match spec {
            ModelSpec::Mlp { hidden } => {
                let mut widths = vec![inputs];
                widths.extend(hidden);
                widths.push(classes);
                for (i, pair) in widths.windows(2).enumerate() {
                    let last = i + 2 == widths.len();
                    layers.push(b.linear(&format!("fc{}", i + 1), pair[0], pair[1], !last)?);
                }
                format!(
                    "mlp[{}]",
                    widths
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("-")
                )
            }
            ModelSpec::Logreg => {
                layers.push(b.linear("linear", inputs, classes, false)?);
                format!("logreg[{inputs}-{classes}]")
            }
            ModelSpec::Cnn => {
                let &[c, h, w] = sample_shape else {
                    bail!(
                        "the CNN needs image samples [channels, height, width], got shape {sample_shape:?}"
                    );
                };
                ensure!(
                    h >= 7 && w >= 7,
                    "the CNN needs images of at least 7×7 pixels (two 3/2 max-pools), got {h}×{w}"
                );
                layers.push(b.conv("conv1", c, 64)?);
                layers.push(b.conv("conv2", 64, 64)?);
                layers.push(Layer::Flatten);
                let flat = 64 * pooled(pooled(h)) * pooled(pooled(w));
                layers.push(b.linear("fc1", flat, 384, true)?);
                layers.push(b.linear("fc2", 384, 192, true)?);
                layers.push(b.linear("fc3", 192, classes, false)?);
                format!("cnn[{c}x{h}x{w}-{classes}]")
            }
            &ModelSpec::Resnet { width } => {
                let &[c, h, w] = sample_shape else {
                    bail!(
                        "the residual CNN needs image samples [channels, height, width], got \
                         shape {sample_shape:?}"
                    );
                };
                built = Some(Graph::ResNet(ResNet::build(&mut b, c, width, classes)?));
                format!("resnet[{c}x{h}x{w}-w{width}-{classes}]")
            }
            &ModelSpec::Transformer {
                layers: depth,
                dim,
                heads,
                context,
            } => {
                let &[window] = sample_shape else {
                    bail!(
                        "the transformer needs token windows (text data), got samples of shape \
                         {sample_shape:?}"
                    );
                };
                ensure!(
                    window <= context,
                    "text windows of {window} tokens are longer than the transformer's context \
                     of {context}; use a shorter --window or a longer context"
                );
                let shape = TransformerShape {
                    layers: depth,
                    dim,
                    heads,
                    context,
                };
                built = Some(Graph::Transformer(Transformer::build(
                    &mut b, shape, classes,
                )?));
                format!("transformer[{depth}x{dim}/{heads}-ctx{context}-vocab{classes}]")
            }
        };
        let graph = built.unwrap_or(Graph::Layers(layers));
        Ok(Self {
            spec: spec.clone(),
            manifest: Manifest {
                model: label,
                tensors: b.tensors,
            },
            vars: b.vars,
            graph,
            sample_shape: sample_shape.to_vec(),
            device: device.clone(),
        })
    }

    /// The spec this model was built from.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The ordered tensor list and its hash.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Trainable parameters, in manifest order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Shape of one input sample.
    pub fn sample_shape(&self) -> &[usize] {
        &self.sample_shape
    }

    /// Logits for a batch `[B, ...sample_shape]`: `[B, classes]`, or for a language model
    /// `[B·T, vocab]`, one row per position.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let layers = match &self.graph {
            Graph::Transformer(t) => return t.forward(&self.vars, x),
            Graph::ResNet(r) => return r.forward(&self.vars, x),
            Graph::Layers(layers) => layers,
        };
        let batch = x.dim(0)?;
        let mut h = if matches!(self.spec, ModelSpec::Cnn) {
            x.clone()
        } else {
            x.reshape((batch, ()))?
        };
        for layer in layers {
            h = match *layer {
                Layer::Linear { w, b, relu } => {
                    linear(&h, self.vars[w].as_tensor(), self.vars[b].as_tensor(), relu)?
                }
                Layer::ConvPool { w, b } => {
                    let (w, b) = (self.vars[w].as_tensor(), self.vars[b].as_tensor());
                    conv_relu_pool(&h, w, b, 2, 1)?
                }
                Layer::Flatten => h.flatten_from(1)?,
            };
        }
        Ok(h)
    }

    /// Logits and the class each row should predict: the labels, or for a language model
    /// the next token at every position.
    fn logits_and_targets(&self, x: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = self.forward(x)?;
        let targets = match self.graph {
            Graph::Transformer(_) => next_tokens(x, y)?,
            Graph::Layers(_) | Graph::ResNet(_) => y.clone(),
        };
        Ok((logits, targets))
    }

    /// Mean cross-entropy on the batch and its gradient for every parameter, in manifest order.
    pub fn loss_and_grads(&self, x: &Tensor, y: &Tensor) -> Result<(f32, Vec<Tensor>)> {
        let (logits, targets) = self.logits_and_targets(x, y)?;
        let loss = cross_entropy(&logits, &targets)?;
        let grads = loss.backward()?;
        let per_param = self
            .vars
            .iter()
            .zip(&self.manifest.tensors)
            .map(|(v, spec)| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .with_context(|| format!("no gradient for {}", spec.name))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((loss.to_scalar::<f32>()?, per_param))
    }

    /// Mean cross-entropy, the number of correct top-1 predictions and the number of
    /// predictions on a batch (one per sample, or per position for a language model).
    pub fn loss_and_correct(&self, x: &Tensor, y: &Tensor) -> Result<(f32, usize, usize)> {
        let (logits, targets) = self.logits_and_targets(x, y)?;
        let loss = cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
        let pred = logits.argmax(D::Minus1)?;
        let correct = pred
            .eq(&targets)?
            .to_dtype(candle_core::DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()?;
        Ok((loss, correct as usize, targets.elem_count()))
    }

    /// Copies every parameter out as a flat `f32` vector, in manifest order.
    pub fn export(&self) -> Result<Vec<Vec<f32>>> {
        self.vars
            .iter()
            .map(|v| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?))
            .collect()
    }

    /// Overwrites every parameter from flat vectors in manifest order; shapes are checked.
    pub fn import(&self, values: &[Vec<f32>]) -> Result<()> {
        ensure!(
            values.len() == self.vars.len(),
            "{} tensors given, the model has {}",
            values.len(),
            self.vars.len()
        );
        for ((var, spec), v) in self.vars.iter().zip(&self.manifest.tensors).zip(values) {
            ensure!(
                v.len() == spec.numel(),
                "{}: {} values given, shape {:?} needs {}",
                spec.name,
                v.len(),
                spec.shape,
                spec.numel()
            );
            crate::train::cpu_buffers::overwrite(var, v)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_specs() {
        assert_eq!(ModelSpec::parse("mlp").unwrap(), ModelSpec::default_mlp());
        assert_eq!(
            ModelSpec::parse("mlp:32,16").unwrap(),
            ModelSpec::Mlp {
                hidden: vec![32, 16]
            }
        );
        assert!(
            ModelSpec::parse("mlp:0")
                .unwrap_err()
                .to_string()
                .contains("positive")
        );
        for (spec, says) in [
            (
                "mlp:32, x",
                "MLP width \" x\" in \"mlp:32, x\" is not a positive integer",
            ),
            (
                "resnet:0",
                "resnet width \"0\" in \"resnet:0\" is not a positive integer",
            ),
            (
                "transformer:2,64,0,64",
                "transformer size \"0\" in \"transformer:2,64,0,64\" is not a positive integer",
            ),
        ] {
            let e = ModelSpec::parse(spec).unwrap_err().to_string();
            assert_eq!(e, says);
        }
        assert!(
            ModelSpec::parse("transformer:2,64,4")
                .unwrap_err()
                .to_string()
                .contains("LAYERS,DIM,HEADS,CONTEXT")
        );
        assert!(
            ModelSpec::parse("rnn")
                .unwrap_err()
                .to_string()
                .contains("unknown model")
        );
    }

    #[test]
    fn a_spec_prints_as_it_parses() {
        for s in [
            "mlp:256",
            "mlp:1024,1024",
            "cnn",
            "logreg",
            "resnet:16",
            "transformer:2,64,4,64",
        ] {
            assert_eq!(ModelSpec::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn manifests_list_every_tensor() {
        let dev = Device::Cpu;
        let m = Model::new(
            &ModelSpec::Mlp { hidden: vec![16] },
            &[1, 8, 8],
            10,
            1,
            &dev,
        )
        .unwrap();
        let names: Vec<_> = m
            .manifest()
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
        assert_eq!(m.manifest().params(), 64 * 16 + 16 + 16 * 10 + 10);
        let cnn = Model::new(&ModelSpec::Cnn, &[3, 32, 32], 10, 1, &dev).unwrap();
        assert_eq!(cnn.manifest().tensors[4].shape, vec![384, 64 * 7 * 7]);
        let x = Tensor::zeros((2, 3, 32, 32), candle_core::DType::F32, &dev).unwrap();
        assert_eq!(cnn.forward(&x).unwrap().dims(), &[2, 10]);
    }

    #[test]
    fn init_is_a_function_of_the_seed() {
        let dev = Device::Cpu;
        let spec = ModelSpec::Logreg;
        let a = Model::new(&spec, &[5], 3, 9, &dev)
            .unwrap()
            .export()
            .unwrap();
        let b = Model::new(&spec, &[5], 3, 9, &dev)
            .unwrap()
            .export()
            .unwrap();
        let c = Model::new(&spec, &[5], 3, 10, &dev)
            .unwrap()
            .export()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn cnn_rejects_flat_or_tiny_inputs() {
        let dev = Device::Cpu;
        let err = Model::new(&ModelSpec::Cnn, &[12], 3, 0, &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("image samples"), "{err}");
        let err = Model::new(&ModelSpec::Cnn, &[1, 4, 4], 3, 0, &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("at least 7"), "{err}");
    }

    #[test]
    fn import_checks_sizes() {
        let m = Model::new(&ModelSpec::Logreg, &[4], 2, 0, &Device::Cpu).unwrap();
        let err = m
            .import(&[vec![0.0; 3], vec![0.0; 2]])
            .unwrap_err()
            .to_string();
        assert!(err.contains("linear.weight"), "{err}");
        let v = vec![vec![0.5; 8], vec![0.25; 2]];
        m.import(&v).unwrap();
        assert_eq!(m.export().unwrap(), v);
    }
}
