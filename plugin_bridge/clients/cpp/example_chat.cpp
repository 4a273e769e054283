// example_chat.cpp: end-to-end checks of the npcforge C++ client against a live `npcforge serve`.
//
// Build: g++ -std=c++17 -Wall -Wextra -Werror -pthread example_chat.cpp -o example_chat
// Usage: ./example_chat HOST PORT [CHARACTER]
// Checks the JSON reader/writer offline, then connects, lists the characters, holds a streamed two-turn
// conversation, reads the history, runs two chats at once on one connection, cancels a long reply from another
// thread, resets the conversation, provokes an error and destroys a client mid-reply. With NPCFORGE_TOKEN set
// it uses that token and checks that a hello without it is refused. One line per check; exit 0 only if all pass.
#include "npcforge_client.hpp"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

using npcforge::Json;

namespace {

int passed = 0, failed = 0;
// Long enough that the reply is still streaming when the cancel lands, short enough to fit the tiny
// model's context next to the persona prompt.
constexpr int kLongReply = 512;

// The same variable the server reads (NPCFORGE_TOKEN); empty when the server needs none.
std::string token() {
    const char* t = std::getenv("NPCFORGE_TOKEN");
    return t ? t : "";
}

void check(bool ok, const std::string& name, const std::string& detail = "") {
    (ok ? passed : failed)++;
    std::cout << (ok ? "ok   " : "FAIL ") << name << (ok || detail.empty() ? "" : ": " + detail) << std::endl;
}

bool throws(const std::string& text) {
    try {
        Json::parse(text);
        return false;
    } catch (const npcforge::JsonError&) {
        return true;
    }
}

std::string no_space(const std::string& s) {
    std::string out;
    for (char c : s)
        if (!std::isspace(static_cast<unsigned char>(c))) out += c;
    return out;
}

void json_checks() {
    const std::string tricky = "q\"b\\s/\n\r\t\b\f\x01 \xc3\xa9 \xf0\x9f\x98\x80";  // é and 😀 as UTF-8
    std::string written = Json(tricky).dump();
    check(written == "\"q\\\"b\\\\s/\\n\\r\\t\\b\\f\\u0001 \xc3\xa9 \xf0\x9f\x98\x80\"", "json: string escaping",
          written);
    check(Json::parse(written).as_string() == tricky, "json: string round trip");
    std::string decoded = Json::parse("\"\\u00e9\\ud83d\\ude00\\/\"").as_string();
    check(decoded == "\xc3\xa9\xf0\x9f\x98\x80/", "json: \\u escapes and a surrogate pair", decoded);
    check(Json::parse("\"\\ud800x\"").as_string() == "\xef\xbf\xbdx", "json: lone surrogate becomes U+FFFD");
    bool refused = false;
    try {
        Json("bad \xff utf-8").dump();
    } catch (const npcforge::JsonError&) {
        refused = true;
    }
    check(refused, "json: invalid UTF-8 refused when writing");
    Json obj = Json::parse(" {\"a\": [1, -2, 3.5, 1e3, -0.25E-2, true, false, null], \"b\": {\"c\": \"d\"},"
                           " \"big\": 12345678901234, \"huge\": 123456789012345678901} ");
    const auto& a = obj.at("a").as_array();
    check(a.size() == 8 && a[0].as_int() == 1 && a[1].as_int() == -2 && a[2].as_double() == 3.5 &&
              a[3].as_double() == 1000.0 && a[4].as_double() == -0.0025 && a[5].as_bool() && !a[6].as_bool() &&
              a[7].is_null() && obj.at("big").as_int() == 12345678901234LL && !obj.at("huge").is_int() &&
              obj.at("huge").as_double() == 123456789012345678901.0,
          "json: numbers and literals");
    std::string compact = obj.dump();
    check(compact == "{\"a\":[1,-2,3.5,1000.0,-0.0025,true,false,null],\"b\":{\"c\":\"d\"},"
                     "\"big\":12345678901234,\"huge\":1.2345678901234568e+20}",
          "json: compact writing", compact);
    check(Json::parse(compact) == obj, "json: dump then parse gives the same value");
    check(throws("{\"a\":1,}") && throws("\"\\x\"") && throws("01") && throws("\"abc") && throws("[1 2]") &&
              throws("\"\\ud83\"") && throws("\"a\nb\"") && throws("{} x") && throws("") && throws("nul"),
          "json: malformed input rejected");
}

// A streamed reply as the callbacks saw it. Callbacks run on the reader thread, checks on this one.
struct Reply {
    std::mutex mutex;
    std::string tokens, sentences;
    int token_count = 0;
};

npcforge::ChatCallbacks collect(Reply& reply) {
    npcforge::ChatCallbacks cb;
    cb.on_token = [&reply](const std::string& t) {
        std::lock_guard<std::mutex> lock(reply.mutex);
        reply.tokens += t;
        reply.token_count++;
    };
    cb.on_sentence = [&reply](const std::string& s) {
        std::lock_guard<std::mutex> lock(reply.mutex);
        reply.sentences += s + " ";
    };
    return cb;
}

void check_reply(Reply& reply, const npcforge::ChatResult& done, const std::string& name) {
    std::lock_guard<std::mutex> lock(reply.mutex);
    check(done.finish_reason == "stop" || done.finish_reason == "length", name + ": finish_reason", done.finish_reason);
    check(reply.token_count > 0 && reply.tokens == done.text, name + ": tokens add up to done.text",
          std::to_string(reply.token_count) + " tokens, '" + reply.tokens + "' vs '" + done.text + "'");
    check(no_space(reply.sentences) == no_space(done.text), name + ": sentences cover the reply",
          "'" + reply.sentences + "'");
    check(done.prompt_tokens > 0 && done.completion_tokens > 0 && done.total_s >= done.ttft_s,
          name + ": usage and timings");
}

// Returns the character it talked to.
std::string server_checks(const std::string& host, int port, std::string character) {
    if (!token().empty()) {
        std::string code = "(connected)";
        try {
            npcforge::Client intruder(host, port);
        } catch (const npcforge::Error& e) {
            code = e.code;
        }
        check(code == "unauthorized", "auth: hello without the token refused", code);
    }
    npcforge::Client client(host, port, token(), "example-chat");
    client.on_background_error(
        [](const std::exception& e) { std::cout << "background error: " << e.what() << std::endl; });
    check(client.server_info().at("protocol").as_int() == 1, "hello: protocol 1");

    auto characters = client.list();
    check(!characters.empty(), "list: characters served");
    if (character.empty() && !characters.empty()) character = characters[0].id;
    check(std::any_of(characters.begin(), characters.end(), [&](const auto& c) { return c.id == character; }),
          "list: " + character + " is served");
    std::cout << "character: " << character << std::endl;

    npcforge::ChatOptions options;
    options.max_tokens = 24;
    options.temperature = 0.8;
    options.seed = 7;
    const std::string session = "example-chat";
    // Fresh conversations, so that a rerun against the same server sees the same prompts (and seeded replies).
    for (const char* s : {"example-chat", "example-blocking", "example-a", "example-b", "example-cancel"})
        client.reset(character, s);
    const std::string asks[] = {"Hello there! Who are you?", "Tell me about this place."};
    std::vector<std::string> answers;
    for (const auto& ask : asks) {
        Reply reply;
        auto done = client.chat_stream(character, session, ask, options, collect(reply)).wait();
        check_reply(reply, done, "turn " + std::to_string(answers.size() + 1));
        answers.push_back(done.text);
    }

    auto history = client.history(character, session);
    check(history.size() == 4 && history[0].role == "user" && history[0].content == asks[0] &&
              history[1].role == "assistant" && history[1].content == answers[0] && history[2].content == asks[1] &&
              history[3].content == answers[1],
          "history: both turns in order", std::to_string(history.size()) + " messages");

    auto blocking = client.chat(character, "example-blocking", "Good evening.", options);
    check(!blocking.text.empty() && blocking.completion_tokens > 0, "blocking chat: whole reply");

    Reply first, second;
    auto h1 = client.chat_stream(character, "example-a", "Good morning.", options, collect(first));
    auto h2 = client.chat_stream(character, "example-b", "Any news?", options, collect(second));
    auto d1 = h1.wait();
    auto d2 = h2.wait();
    check(first.tokens == d1.text && second.tokens == d2.text && first.token_count > 0 && second.token_count > 0 &&
              h1.id() != h2.id(),
          "two chats at once: events routed by id");

    // Cancel from another thread, as a game would from its main loop, once the first token is in.
    npcforge::ChatOptions long_options;
    long_options.max_tokens = kLongReply;
    long_options.temperature = 0.8;
    long_options.seed = 11;
    Reply long_reply;
    std::atomic<bool> first_token{false};
    auto cb = collect(long_reply);
    auto on_token = cb.on_token;
    cb.on_token = [on_token, &first_token](const std::string& t) {
        on_token(t);
        first_token = true;
    };
    auto long_handle = client.chat_stream(character, "example-cancel", "Tell me a very long story.", long_options, cb);
    std::thread canceller([&] {
        while (!first_token && !long_handle.finished()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        long_handle.cancel();
    });
    npcforge::ChatResult cut;
    try {
        cut = long_handle.wait();
    } catch (...) {
        canceller.join();  // the reply failed, so finished() is true and the canceller ends
        throw;
    }
    canceller.join();
    check(cut.finish_reason == "cancelled" && cut.completion_tokens < kLongReply && long_reply.tokens == cut.text,
          "cancel: reply stopped early",
          cut.finish_reason + " after " + std::to_string(cut.completion_tokens) + " tokens");
    check(!client.cancel(long_handle.id()), "cancel: a finished chat is not_found");

    client.reset(character, session);
    check(client.history(character, session).empty(), "reset: history forgotten");

    std::string error_code;
    npcforge::ChatCallbacks bad_cb;
    bad_cb.on_error = [&error_code](const npcforge::Error& e) { error_code = e.code; };
    auto bad = client.chat_stream("no-such-character", session, "hi", {}, bad_cb);
    try {
        bad.wait();
        check(false, "error: unknown character refused", "the chat succeeded");
    } catch (const npcforge::Error& e) {
        check(e.code == "unknown_character" && error_code == "unknown_character", "error: unknown character refused",
              e.code + " / " + error_code);
    }
    return character;
}

// Destroying the client mid-reply must fail that reply with "disconnected"; its handle outlives the client.
void disconnect_check(const std::string& host, int port, const std::string& character) {
    std::optional<npcforge::ChatHandle> handle;
    std::atomic<bool> first_token{false};
    {
        npcforge::Client client(host, port, token());
        npcforge::ChatOptions options;
        options.max_tokens = kLongReply;
        options.seed = 3;
        npcforge::ChatCallbacks cb;
        cb.on_token = [&first_token](const std::string&) { first_token = true; };
        client.reset(character, "example-disconnect");
        handle = client.chat_stream(character, "example-disconnect", "Tell me a very long story.", options, cb);
        while (!first_token && !handle->finished()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    std::string code;
    try {
        handle->wait();
    } catch (const npcforge::Error& e) {
        code = e.code;
    }
    handle->cancel();  // the client is gone: a no-op, not a crash
    check(code == "disconnected", "destroy: reply in flight fails as disconnected", "code " + code);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::cerr << "usage: example_chat HOST PORT [CHARACTER]" << std::endl;
        return 2;
    }
    json_checks();
    try {
        std::string character = server_checks(argv[1], std::stoi(argv[2]), argc > 3 ? argv[3] : "");
        disconnect_check(argv[1], std::stoi(argv[2]), character);
    } catch (const std::exception& e) {
        check(false, "server checks", e.what());
    }
    if (failed == 0) std::cout << "ALL CHECKS PASSED (" << passed << ")" << std::endl;
    else std::cout << failed << " CHECK(S) FAILED" << std::endl;
    return failed == 0 ? 0 : 1;
}
