//! The one telemetry ingestion pipeline of every transport (being written).

/// The pipeline.
pub struct Pipeline;
