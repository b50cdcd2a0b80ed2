-- Trust rules (PROTOCOL.md): the member a message was delivered to, the one party whose
-- callback is taken for it (recorded with the upstream's acknowledgement or answer).
ALTER TABLE messages ADD COLUMN receiver text;
