"""Reference workloads: model, data, loss, quality metric, repeated blocks and analytic activation model."""
