-- Conversations belong to the user id the gateway forwards (X-User-Id).
CREATE TABLE conversations (
    id          uuid PRIMARY KEY,
    user_id     text NOT NULL,
    title       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Listing a user's conversations, newest activity first, with a keyset cursor.
CREATE INDEX conversations_user_updated_idx
    ON conversations (user_id, updated_at DESC, id DESC);

CREATE TABLE messages (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id    uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role               text NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content            text NOT NULL,
    prompt_tokens      integer CHECK (prompt_tokens >= 0),
    completion_tokens  integer CHECK (completion_tokens >= 0),
    -- false when the stream was cut (client left, model failed): what arrived is kept.
    complete           boolean NOT NULL DEFAULT true,
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX messages_conversation_idx ON messages (conversation_id, id);
