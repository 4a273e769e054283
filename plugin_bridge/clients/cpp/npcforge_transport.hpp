// npcforge_transport.hpp: the connection under the npcforge C++ client (header-only, C++17).
//
// One TCP socket (POSIX, or Winsock under _WIN32), one reader thread that splits the NDJSON stream into lines,
// parses them and dispatches each event by request id to its Pending record (callbacks, then completion), and a
// serialised writer. Input: requests as npcforge::Json; output: callbacks and finished Pending records. The public
// API (npcforge::Client, ChatHandle) lives in npcforge_client.hpp; include that one.
#pragma once

#include "npcforge_json.hpp"

#ifdef _WIN32
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <winsock2.h>
#include <ws2tcpip.h>
#ifdef _MSC_VER
#pragma comment(lib, "Ws2_32.lib")
#endif
#else
#include <cerrno>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>
#endif

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace npcforge {

// A failed request: code is the protocol's error code (unknown_character, bad_request, ...), "disconnected" when
// the connection ended first, "connect_failed" when it never opened, "bad_response" for a malformed answer.
struct Error : std::runtime_error {
    std::string code;
    Error(const std::string& code_, const std::string& message)
        : std::runtime_error(code_ + ": " + message), code(code_) {}
};

// The `done` event of a chat. finish_reason: stop, length, cancelled or shutdown.
struct ChatResult {
    std::string finish_reason;
    std::string text;
    int64_t prompt_tokens = 0;
    int64_t completion_tokens = 0;
    double ttft_s = 0;
    double tokens_per_s = 0;
    double total_s = 0;
    bool truncated_history = false;
};

// Each may be empty. Exactly one of on_done / on_error ends every chat.
struct ChatCallbacks {
    std::function<void(const std::string&)> on_token;
    std::function<void(const std::string&)> on_sentence;
    std::function<void(const ChatResult&)> on_done;
    std::function<void(const Error&)> on_error;
};

namespace detail {

#ifdef _WIN32
using socket_t = SOCKET;
constexpr socket_t kNoSocket = INVALID_SOCKET;
inline void close_socket(socket_t s) { ::closesocket(s); }
inline void shutdown_socket(socket_t s) { ::shutdown(s, SD_BOTH); }
inline bool interrupted() { return false; }
inline void init_sockets() {
    struct Winsock {
        Winsock() {
            WSADATA data;
            if (WSAStartup(MAKEWORD(2, 2), &data) != 0) throw Error("connect_failed", "WSAStartup failed");
        }
        ~Winsock() { WSACleanup(); }
    };
    static Winsock winsock;
}
#else
using socket_t = int;
constexpr socket_t kNoSocket = -1;
inline void close_socket(socket_t s) { ::close(s); }
inline void shutdown_socket(socket_t s) { ::shutdown(s, SHUT_RDWR); }
inline bool interrupted() { return errno == EINTR; }
inline void init_sockets() {}
#endif

#ifdef MSG_NOSIGNAL
constexpr int kSendFlags = MSG_NOSIGNAL;  // a closed peer must give an error, not kill the game with SIGPIPE
#else
constexpr int kSendFlags = 0;
#endif

inline ChatResult result_of(const Json& ev) {
    ChatResult r;
    r.finish_reason = ev.at("finish_reason").as_string();
    r.text = ev.at("text").as_string();
    const Json& usage = ev.at("usage");
    r.prompt_tokens = usage.at("prompt_tokens").as_int();
    r.completion_tokens = usage.at("completion_tokens").as_int();
    const Json& timings = ev.at("timings");
    r.ttft_s = timings.at("ttft_s").as_double();
    r.tokens_per_s = timings.at("tokens_per_s").as_double();
    r.total_s = timings.at("total_s").as_double();
    const Json* truncated = ev.find("truncated_history");
    r.truncated_history = truncated && truncated->is_bool() && truncated->as_bool();
    return r;
}

inline Error error_of(const Json& ev) {
    const Json* code = ev.find("code");
    const Json* message = ev.find("message");
    return Error(code && code->is_string() ? code->as_string() : "internal",
                 message && message->is_string() ? message->as_string() : "(no message)");
}

// The state of one request in flight, shared by the reader thread and whoever waits on it.
struct Pending {
    ChatCallbacks callbacks;
    std::mutex mutex;
    std::condition_variable cv;
    bool finished = false;
    Json data;          // result.data of a non-chat request
    ChatResult result;  // done of a chat
    std::optional<Error> error;

    void finish(std::optional<Error> failure) {
        {
            std::lock_guard<std::mutex> lock(mutex);
            if (finished) return;
            error = std::move(failure);
            finished = true;
        }
        cv.notify_all();
    }

    void wait() {
        std::unique_lock<std::mutex> lock(mutex);
        cv.wait(lock, [this] { return finished; });
    }
};

class Connection : public std::enable_shared_from_this<Connection> {
public:
    using ErrorHandler = std::function<void(const std::exception&)>;

    // The reader thread holds a reference, so this runs either after it exited or on it, as its last act.
    ~Connection() {
        if (reader_.joinable()) {
            if (on_reader_thread()) reader_.detach();
            else reader_.join();
        }
        if (sock_ != kNoSocket) close_socket(sock_);
    }

    void open(const std::string& host, int port) {
        init_sockets();
        addrinfo hints{};
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        addrinfo* found = nullptr;
        std::string service = std::to_string(port);
        int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &found);
        if (rc != 0 || !found) throw Error("connect_failed", "cannot resolve " + host);
        for (addrinfo* a = found; a && sock_ == kNoSocket; a = a->ai_next) {
            socket_t s = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
            if (s == kNoSocket) continue;
            if (::connect(s, a->ai_addr, static_cast<int>(a->ai_addrlen)) == 0) sock_ = s;
            else close_socket(s);
        }
        ::freeaddrinfo(found);
        if (sock_ == kNoSocket)
            throw Error("connect_failed",
                        "cannot connect to " + host + ":" + service + " (is npcforge serve running?)");
        int one = 1;  // replies are many small lines: do not let Nagle hold them back
        ::setsockopt(sock_, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&one), sizeof one);
#ifdef SO_NOSIGPIPE
        ::setsockopt(sock_, SOL_SOCKET, SO_NOSIGPIPE, reinterpret_cast<const char*>(&one), sizeof one);
#endif
        auto self = shared_from_this();
        reader_ = std::thread([self] { self->read_loop(); });
    }

    int64_t next_id() { return ++last_id_; }

    bool on_reader_thread() const { return std::this_thread::get_id() == reader_id_.load(); }

    void set_error_handler(ErrorHandler handler) {
        std::lock_guard<std::mutex> lock(pending_mutex_);
        error_handler_ = std::move(handler);
    }

    // Registers `pending` under `id` and writes the request; a dead connection finishes it as "disconnected".
    void send(int64_t id, Json request, const std::shared_ptr<Pending>& pending) {
        request["id"] = Json(static_cast<long long>(id));
        std::string line = request.dump();
        line += '\n';
        {
            std::lock_guard<std::mutex> lock(pending_mutex_);
            if (closed_) {
                pending->finish(Error("disconnected", "the connection is closed"));
                return;
            }
            pending_[id] = pending;  // registered first: the answer may arrive before send() returns
        }
        std::lock_guard<std::mutex> write_lock(write_mutex_);
        size_t sent = 0;
        while (sent < line.size()) {
            auto n = ::send(sock_, line.data() + sent, static_cast<int>(line.size() - sent), kSendFlags);
            if (n < 0 && interrupted()) continue;
            if (n <= 0) {
                {
                    std::lock_guard<std::mutex> lock(pending_mutex_);
                    pending_.erase(id);
                }
                pending->finish(Error("disconnected", "send failed"));
                return;
            }
            sent += static_cast<size_t>(n);
        }
    }

    // Ends the connection: the reader wakes up, fails what is in flight and exits. Safe to call more than
    // once, from any thread; off the reader thread it waits for the reader to finish.
    void close() {
        {
            std::lock_guard<std::mutex> lock(pending_mutex_);
            closed_ = true;
        }
        if (sock_ != kNoSocket) shutdown_socket(sock_);
        if (reader_.joinable() && !on_reader_thread()) reader_.join();
    }

private:
    // Server lines are bounded by the reply sizes the protocol allows; anything far beyond that is garbage.
    static constexpr size_t kMaxLineBytes = 16u << 20;

    socket_t sock_ = kNoSocket;
    std::thread reader_;
    std::atomic<std::thread::id> reader_id_{};
    std::atomic<int64_t> last_id_{0};
    std::mutex write_mutex_;
    std::mutex pending_mutex_;
    std::map<int64_t, std::shared_ptr<Pending>> pending_;
    ErrorHandler error_handler_;
    bool closed_ = false;

    void report(const std::exception& e) {
        ErrorHandler handler;
        {
            std::lock_guard<std::mutex> lock(pending_mutex_);
            handler = error_handler_;
        }
        if (!handler) return;
        try {
            handler(e);
        } catch (...) {
            // a failing error handler must not kill the reader thread
        }
    }

    template <class F>
    void call(F&& callback) {
        try {
            callback();
        } catch (const std::exception& e) {
            report(e);
        } catch (...) {
            report(std::runtime_error("a callback threw a non-standard exception"));
        }
    }

    void read_loop() {
        reader_id_ = std::this_thread::get_id();
        std::string buffer;
        char chunk[8192];
        std::string reason = "connection closed by the server";
        while (true) {
            auto n = ::recv(sock_, chunk, static_cast<int>(sizeof chunk), 0);
            if (n < 0 && interrupted()) continue;
            if (n <= 0) break;
            buffer.append(chunk, static_cast<size_t>(n));
            size_t start = 0, newline;
            while ((newline = buffer.find('\n', start)) != std::string::npos) {
                dispatch(std::string_view(buffer).substr(start, newline - start));
                start = newline + 1;
            }
            buffer.erase(0, start);
            if (buffer.size() > kMaxLineBytes) {
                reason = "server line longer than " + std::to_string(kMaxLineBytes) + " bytes";
                break;
            }
        }
        std::map<int64_t, std::shared_ptr<Pending>> orphans;
        {
            std::lock_guard<std::mutex> lock(pending_mutex_);
            if (closed_) reason = "connection closed by the client";
            closed_ = true;
            orphans.swap(pending_);
        }
        Error error("disconnected", reason);
        for (auto& kv : orphans) {
            if (kv.second->callbacks.on_error) call([&] { kv.second->callbacks.on_error(error); });
            kv.second->finish(error);
        }
    }

    void dispatch(std::string_view line) {
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        if (line.find_first_not_of(" \t") == std::string_view::npos) return;
        Json ev;
        try {
            ev = Json::parse(line);
            if (!ev.is_object() || !ev.contains("event") || !ev.at("event").is_string())
                throw JsonError("server line is not an event: " + std::string(line));
        } catch (const JsonError& e) {
            report(e);
            return;
        }
        const std::string& kind = ev.at("event").as_string();
        const Json* id = ev.find("id");
        std::shared_ptr<Pending> p;
        if (id && id->is_int()) {
            std::lock_guard<std::mutex> lock(pending_mutex_);
            auto it = pending_.find(id->as_int());
            if (it != pending_.end()) p = it->second;
        }
        if (!p) {
            if (kind == "error") report(error_of(ev));
            return;
        }
        bool finished = false;
        std::optional<Error> failure;
        try {
            const ChatCallbacks& cb = p->callbacks;
            if (kind == "token") {
                const std::string& text = ev.at("text").as_string();
                if (cb.on_token) call([&] { cb.on_token(text); });
            } else if (kind == "sentence") {
                const std::string& text = ev.at("text").as_string();
                if (cb.on_sentence) call([&] { cb.on_sentence(text); });
            } else if (kind == "done") {
                p->result = result_of(ev);
                if (cb.on_done) call([&] { cb.on_done(p->result); });
                finished = true;
            } else if (kind == "result") {
                p->data = ev.at("data");
                finished = true;
            } else if (kind == "error") {
                failure = error_of(ev);
                finished = true;
            }
        } catch (const JsonError& e) {
            failure = Error("bad_response", e.what());
            finished = true;
        }
        if (!finished) return;
        {
            std::lock_guard<std::mutex> lock(pending_mutex_);
            pending_.erase(id->as_int());
        }
        if (failure && p->callbacks.on_error) call([&] { p->callbacks.on_error(*failure); });
        p->finish(std::move(failure));
    }
};

}  // namespace detail

}  // namespace npcforge
