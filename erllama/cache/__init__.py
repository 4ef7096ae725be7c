"""The KV-state cache: token-exact keys, three tiers with quotas, a sole-writer index,
asynchronous crash-safe saves. Payloads are opaque bytes here; no model is needed."""
