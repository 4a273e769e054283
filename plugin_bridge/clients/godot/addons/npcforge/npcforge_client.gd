## NpcForgeClient: the Godot 4 client of `npcforge serve` (docs/protocol.md, version 1).
##
## Add the node, call connect_to_server(), then chat(); every request method returns its request
## id at once. Answers arrive as signals, matched by that id: token_received / sentence_received
## while a reply streams, then reply_finished (the `done` event) or error. Other requests answer
## with request_completed. The socket is polled in _process, so all signals fire on the main
## thread: touch the scene tree freely.
class_name NpcForgeClient
extends Node

## Connected and greeted; server_info is the `hello` answer (protocol, server, limits...).
signal connected(server_info: Dictionary)
## The connection ended; each request still in flight got an `error` "disconnected" first.
signal disconnected(reason: String)
signal token_received(request_id: int, text: String)
## One whole sentence of a reply, for text-to-speech.
signal sentence_received(request_id: int, text: String)
## The `done` event: finish_reason, text, usage, timings, truncated_history.
signal reply_finished(request_id: int, result: Dictionary)
## The answer to a non-chat request: `data` as docs/protocol.md describes it per op.
signal request_completed(request_id: int, op: String, data: Dictionary)
## A failed request (request_id -1 when the server could not tell which one).
signal error(request_id: int, code: String, message: String)

const PROTOCOL_VERSION := 1
## Server lines are bounded by the reply sizes the protocol allows: far beyond that is garbage.
const MAX_LINE_BYTES := 16 * 1024 * 1024

@export var host := "127.0.0.1"
@export var port := 7411
@export var token := ""
@export var client_name := "npcforge-godot"
@export var connect_on_ready := false

var server_info: Dictionary = {}

var _peer := StreamPeerTCP.new()
var _inbox := PackedByteArray()
var _outbox: Array[PackedByteArray] = []
var _in_flight: Dictionary = {}
var _next_id := 0
var _hello_id := -1
var _open := false
var _was_connected := false


func _ready() -> void:
	if connect_on_ready:
		connect_to_server()


func _process(_delta: float) -> void:
	poll()


## Starts connecting (it completes in later frames) and queues the `hello`.
## Returns OK or the socket error.
func connect_to_server(to_host: String = host, to_port: int = port) -> Error:
	close()
	host = to_host
	port = to_port
	var err := _peer.connect_to_host(host, port)
	if err != OK:
		return err
	_open = true
	var hello := {"op": "hello", "version": PROTOCOL_VERSION, "client": client_name}
	if token != "":
		hello["token"] = token
	_hello_id = _send(hello)
	return OK


## True once the server answered `hello`.
func is_ready() -> bool:
	return _open and _was_connected and not server_info.is_empty()


## Starts a reply. options may hold max_tokens, temperature, top_p, top_k, repetition_penalty,
## stop, seed, stream (docs/protocol.md).
func chat(character: String, session: String, text: String, options: Dictionary = {}) -> int:
	var request := {"op": "chat", "character": character, "session": session, "text": text}
	request.merge(options)
	return _send(request)


## Stops the reply of chat `request_id`; it then ends with finish_reason "cancelled".
func cancel(request_id: int) -> int:
	return _send({"op": "cancel", "target": request_id})


func list_characters() -> int:
	return _send({"op": "list"})


func load_character(character: String) -> int:
	return _send({"op": "load", "character": character})


func unload_character(character: String) -> int:
	return _send({"op": "unload", "character": character})


## Forgets the conversation (character, session).
func reset(character: String, session: String) -> int:
	return _send({"op": "reset", "character": character, "session": session})


func history(character: String, session: String) -> int:
	return _send({"op": "history", "character": character, "session": session})


func stats() -> int:
	return _send({"op": "stats"})


## Closes the connection; requests in flight end with an `error` of code "disconnected".
func close() -> void:
	if not _open:
		return
	_peer.disconnect_from_host()
	_finish_connection("closed by the client")


## Reads what the server sent and emits the signals. _process calls it every frame.
func poll() -> void:
	if not _open:
		return
	_peer.poll()
	var status := _peer.get_status()
	if status == StreamPeerTCP.STATUS_CONNECTING:
		return
	if status != StreamPeerTCP.STATUS_CONNECTED:
		var reason := "connection closed"
		if not _was_connected:
			reason = "cannot connect to %s:%d" % [host, port]
		_finish_connection(reason)
		return
	if not _was_connected:
		_was_connected = true
		_peer.set_no_delay(true)
		for line in _outbox:
			_peer.put_data(line)
		_outbox.clear()
	var available := _peer.get_available_bytes()
	if available > 0:
		var got: Array = _peer.get_partial_data(available)
		if got[0] == OK:
			_inbox.append_array(got[1])
	var newline := _inbox.find(10)
	while newline >= 0:
		var line := _inbox.slice(0, newline).get_string_from_utf8()
		_inbox = _inbox.slice(newline + 1)
		_dispatch(line)
		if not _open:
			return
		newline = _inbox.find(10)
	if _inbox.size() > MAX_LINE_BYTES:
		_peer.disconnect_from_host()
		_finish_connection("server line longer than %d bytes" % MAX_LINE_BYTES)


## Writes `value` as JSON. Godot's JSON.stringify writes "\v" (not JSON) and leaves other control
## characters raw, which the server rejects; player text may hold any of them.
static func to_json(value: Variant) -> String:
	match typeof(value):
		TYPE_NIL:
			return "null"
		TYPE_BOOL:
			return "true" if value else "false"
		TYPE_INT:
			return str(value)
		TYPE_FLOAT:
			assert(not is_nan(value) and not is_inf(value), "JSON has no NaN or Infinity")
			return str(value)
		TYPE_STRING, TYPE_STRING_NAME:
			return _quote(String(value))
		TYPE_DICTIONARY:
			var fields := PackedStringArray()
			for key in value:
				fields.append(_quote(str(key)) + ":" + to_json(value[key]))
			return "{" + ",".join(fields) + "}"
		TYPE_ARRAY, TYPE_PACKED_STRING_ARRAY, TYPE_PACKED_INT32_ARRAY, TYPE_PACKED_FLOAT32_ARRAY:
			var items := PackedStringArray()
			for item in value:
				items.append(to_json(item))
			return "[" + ",".join(items) + "]"
	assert(false, "cannot write a %s as JSON" % type_string(typeof(value)))
	return "null"


static func _quote(text: String) -> String:
	var out := '"'
	for i in text.length():
		var ch := text[i]
		var code := text.unicode_at(i)
		if ch == '"':
			out += '\\"'
		elif ch == "\\":
			out += "\\\\"
		elif ch == "\n":
			out += "\\n"
		elif ch == "\r":
			out += "\\r"
		elif ch == "\t":
			out += "\\t"
		elif code < 0x20 or (code >= 0xD800 and code <= 0xDFFF):
			# Control characters and lone surrogates (no UTF-8 form) travel as \u escapes.
			out += "\\u%04x" % code
		else:
			out += ch
	return out + '"'


func _send(request: Dictionary) -> int:
	_next_id += 1
	var id := _next_id
	request["id"] = id
	if not _open:
		# Deferred, so the caller holds the id before its error arrives.
		_fail_unsent.call_deferred(id, "not connected: call connect_to_server() first")
		return id
	_in_flight[id] = request["op"]
	var line := (to_json(request) + "\n").to_utf8_buffer()
	if _was_connected:
		_peer.put_data(line)
	else:
		_outbox.append(line)  # sent once the connection is up, hello first
	return id


func _fail_unsent(id: int, reason: String) -> void:
	error.emit(id, "disconnected", reason)


func _dispatch(line: String) -> void:
	if line.strip_edges() == "":
		return
	var parser := JSON.new()
	if parser.parse(line) != OK or typeof(parser.data) != TYPE_DICTIONARY:
		error.emit(-1, "bad_response", "unreadable server line: %s" % parser.get_error_message())
		return
	var event: Dictionary = parser.data
	# JSON numbers arrive as floats; ids this client sends are always integers.
	var raw_id: Variant = event.get("id")
	var id := int(raw_id) if typeof(raw_id) in [TYPE_INT, TYPE_FLOAT] else -1
	match event.get("event", ""):
		"token":
			token_received.emit(id, str(event.get("text", "")))
		"sentence":
			sentence_received.emit(id, str(event.get("text", "")))
		"done":
			_in_flight.erase(id)
			event.erase("id")
			event.erase("event")
			reply_finished.emit(id, event)
		"result":
			_in_flight.erase(id)
			var data: Dictionary = event.get("data", {})
			if id == _hello_id:
				server_info = data
				connected.emit(data)
			request_completed.emit(id, str(event.get("op", "")), data)
		"error":
			_in_flight.erase(id)
			error.emit(id, str(event.get("code", "internal")), str(event.get("message", "")))
			if id == _hello_id:
				# Refused at the door (a wrong token): nothing else on this connection can work.
				_peer.disconnect_from_host()
				_finish_connection("hello refused: %s" % event.get("message", ""))


func _finish_connection(reason: String) -> void:
	var orphans := _in_flight.keys()
	_open = false
	_was_connected = false
	_in_flight.clear()
	_outbox.clear()
	_inbox.clear()
	server_info = {}
	for id in orphans:
		error.emit(id, "disconnected", reason)
	disconnected.emit(reason)
