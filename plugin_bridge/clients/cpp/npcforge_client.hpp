// npcforge_client.hpp: the npcforge C++ client (header-only, C++17; POSIX sockets, or Winsock under _WIN32).
//
// Speaks docs/protocol.md version 1: NDJSON over one TCP connection to `npcforge serve`. Input: host, port and
// an optional token; requests through the methods of npcforge::Client. Output: blocking answers (list, history,
// chat, ...) or, for streamed chats, callbacks per token / sentence and a ChatHandle to wait on or cancel.
//
// Threading: one reader thread per Client parses every server line and dispatches it by request id; all
// callbacks run on it, so keep them short and hand work to the game thread yourself. Any thread may send
// requests (writes are serialised). Blocking calls made from inside a callback would wait for the very thread
// that runs them, so they throw std::logic_error; ChatHandle::cancel() never blocks and is safe everywhere.
// Link with -pthread (POSIX) or Ws2_32.lib (Windows). The connection itself is in npcforge_transport.hpp.
#pragma once

#include "npcforge_transport.hpp"

#include <chrono>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace npcforge {

constexpr int kProtocolVersion = 1;

// Sampling settings of one chat; an empty optional is left to the server's default.
struct ChatOptions {
    std::optional<int> max_tokens;
    std::optional<double> temperature;
    std::optional<double> top_p;
    std::optional<int> top_k;
    std::optional<double> repetition_penalty;
    std::vector<std::string> stop;
    std::optional<int64_t> seed;
    bool stream = true;
};

struct CharacterInfo {
    std::string id, name, greeting;
    bool loaded = false;
};

struct Message {
    std::string role;  // "user" or "assistant"
    std::string content;
};

// One chat in flight. Copyable; stays valid after the Client is gone (cancel() then does nothing).
class ChatHandle {
public:
    int64_t id() const { return id_; }

    bool finished() const {
        std::lock_guard<std::mutex> lock(state_->mutex);
        return state_->finished;
    }

    // Blocks until the reply ends; returns the `done` event or throws Error.
    ChatResult wait() const {
        check_not_reader();
        state_->wait();
        if (state_->error) throw *state_->error;
        return state_->result;
    }

    // True when the reply ended within `timeout` (then wait() returns at once).
    bool wait_for(std::chrono::milliseconds timeout) const {
        check_not_reader();
        std::unique_lock<std::mutex> lock(state_->mutex);
        return state_->cv.wait_for(lock, timeout, [this] { return state_->finished; });
    }

    // Asks the server to stop the reply (it then ends with finish_reason "cancelled"). Never blocks.
    void cancel() const {
        auto conn = conn_.lock();
        if (!conn) return;
        Json request = Json::object();
        request["op"] = "cancel";
        request["target"] = Json(static_cast<long long>(id_));
        conn->send(conn->next_id(), std::move(request), std::make_shared<detail::Pending>());
    }

private:
    friend class Client;
    ChatHandle(std::weak_ptr<detail::Connection> conn, int64_t id, std::shared_ptr<detail::Pending> state)
        : conn_(std::move(conn)), id_(id), state_(std::move(state)) {}

    void check_not_reader() const {
        auto conn = conn_.lock();
        if (conn && conn->on_reader_thread())
            throw std::logic_error("npcforge: waiting inside a client callback would deadlock");
    }

    std::weak_ptr<detail::Connection> conn_;
    int64_t id_;
    std::shared_ptr<detail::Pending> state_;
};

class Client {
public:
    // Connects and says hello; throws Error (connect_failed, unauthorized, ...) when that fails.
    Client(const std::string& host, int port, const std::string& token = "",
           const std::string& client_name = "npcforge-cpp")
        : conn_(std::make_shared<detail::Connection>()) {
        conn_->open(host, port);
        try {
            Json hello = Json::object();
            hello["version"] = kProtocolVersion;
            hello["client"] = client_name;
            if (!token.empty()) hello["token"] = token;
            server_info_ = request("hello", std::move(hello));
            const Json* protocol = server_info_.find("protocol");
            if (!protocol || !protocol->is_int() || protocol->as_int() < kProtocolVersion)
                throw Error("bad_response",
                            "the server does not speak protocol " + std::to_string(kProtocolVersion));
        } catch (...) {
            conn_->close();
            throw;
        }
    }

    ~Client() { conn_->close(); }
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;

    // The `hello` answer: protocol, server, authenticated, auth_required, limits.
    const Json& server_info() const { return server_info_; }

    // Called on the reader thread for what belongs to no request: error events without a known id,
    // unparseable server lines, and exceptions thrown by your callbacks.
    void on_background_error(std::function<void(const std::exception&)> handler) {
        conn_->set_error_handler(std::move(handler));
    }

    // Sends any non-chat request, blocks for its answer and returns `result.data`; throws Error.
    Json request(const std::string& op, Json fields = Json::object()) {
        if (conn_->on_reader_thread())
            throw std::logic_error("npcforge: a blocking request inside a client callback would deadlock");
        fields["op"] = op;
        auto pending = std::make_shared<detail::Pending>();
        conn_->send(conn_->next_id(), std::move(fields), pending);
        pending->wait();
        if (pending->error) throw *pending->error;
        return pending->data;
    }

    std::vector<CharacterInfo> list() {
        std::vector<CharacterInfo> out;
        Json data = request("list");
        try {
            for (const Json& c : data.at("characters").as_array())
                out.push_back({c.at("id").as_string(), c.at("name").as_string(), c.at("greeting").as_string(),
                               c.at("loaded").as_bool()});
        } catch (const JsonError& e) {
            throw Error("bad_response", std::string("list: ") + e.what());
        }
        return out;
    }

    void load(const std::string& character) { request("load", Json(Json::Object{{"character", character}})); }
    void unload(const std::string& character) { request("unload", Json(Json::Object{{"character", character}})); }

    // Forgets the conversation (character, session).
    void reset(const std::string& character, const std::string& session) {
        request("reset", conversation(character, session));
    }

    std::vector<Message> history(const std::string& character, const std::string& session) {
        std::vector<Message> out;
        Json data = request("history", conversation(character, session));
        try {
            for (const Json& m : data.at("messages").as_array())
                out.push_back({m.at("role").as_string(), m.at("content").as_string()});
        } catch (const JsonError& e) {
            throw Error("bad_response", std::string("history: ") + e.what());
        }
        return out;
    }

    Json stats() { return request("stats"); }

    // Starts a reply and returns at once; callbacks run on the reader thread.
    ChatHandle chat_stream(const std::string& character, const std::string& session, const std::string& text,
                           const ChatOptions& options = {}, ChatCallbacks callbacks = {}) {
        Json req = conversation(character, session);
        req["op"] = "chat";
        req["text"] = text;
        if (options.max_tokens) req["max_tokens"] = *options.max_tokens;
        if (options.temperature) req["temperature"] = *options.temperature;
        if (options.top_p) req["top_p"] = *options.top_p;
        if (options.top_k) req["top_k"] = *options.top_k;
        if (options.repetition_penalty) req["repetition_penalty"] = *options.repetition_penalty;
        if (!options.stop.empty()) {
            Json stop = Json::array();
            for (const auto& s : options.stop) stop.push_back(s);
            req["stop"] = std::move(stop);
        }
        if (options.seed) req["seed"] = Json(static_cast<long long>(*options.seed));
        req["stream"] = options.stream;
        auto pending = std::make_shared<detail::Pending>();
        pending->callbacks = std::move(callbacks);
        int64_t id = conn_->next_id();
        ChatHandle handle(conn_, id, pending);
        conn_->send(id, std::move(req), pending);
        return handle;
    }

    // Blocking chat: the whole reply (no streaming callbacks).
    ChatResult chat(const std::string& character, const std::string& session, const std::string& text,
                    ChatOptions options = {}) {
        options.stream = false;
        return chat_stream(character, session, text, options).wait();
    }

    // Blocking cancel by chat id: true when cancelled, false when the reply had already finished.
    bool cancel(int64_t chat_id) {
        try {
            request("cancel", Json(Json::Object{{"target", Json(static_cast<long long>(chat_id))}}));
            return true;
        } catch (const Error& e) {
            if (e.code == "not_found") return false;
            throw;
        }
    }

private:
    std::shared_ptr<detail::Connection> conn_;
    Json server_info_;

    static Json conversation(const std::string& character, const std::string& session) {
        return Json(Json::Object{{"character", character}, {"session", session}});
    }
};

}  // namespace npcforge
