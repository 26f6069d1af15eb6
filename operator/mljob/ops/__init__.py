"""Operations: metrics, health and readiness, logs, NATS permissions."""
