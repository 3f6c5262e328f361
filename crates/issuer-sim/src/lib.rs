//! The simulated issuer.
