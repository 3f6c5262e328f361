//! MAC algorithms.
