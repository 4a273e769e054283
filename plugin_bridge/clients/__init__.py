"""Engine clients of the bridge protocol (docs/protocol.md); see README.md here."""
