-- W3C trace context of the work that produced each event (the CloudEvents
-- distributed-tracing extension), and of the work a saga command continues.
ALTER TABLE events ADD COLUMN traceparent TEXT;
ALTER TABLE events ADD COLUMN tracestate TEXT;
ALTER TABLE saga_commands ADD COLUMN traceparent TEXT;
ALTER TABLE saga_commands ADD COLUMN tracestate TEXT;
