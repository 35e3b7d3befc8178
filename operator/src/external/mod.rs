//! Typed Karpenter and KEDA resources, generated from their upstream CRDs with kopium
//! (`scripts/gen-external-crds.sh`) and committed. Do not edit by hand.

#![allow(clippy::all, missing_docs, rustdoc::all)]

pub mod karpenter;
pub mod keda_scaled_object;
pub mod keda_trigger_authentication;
