"""TEE mode: the enclave, its attestation, and the masked offload of linear work to an accelerator.

The trainable structure, the per-client session keys and the nonlinear operations live inside an
attested enclave; only one-time-pad-masked tensors leave it. ``attestation`` proves to a client,
before it sends anything, which code and configuration the enclave runs and that the key it
exchanges keys with belongs to that enclave. The simulated backend gives no hardware protection.
"""
